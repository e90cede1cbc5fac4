"""One typed config for a training run: `RunConfig` = `DataConfig` + `ModelConfig` + `TrainConfig`.

A config is built in one place, `build_config`, in this order (later wins):

    defaults (the dataclasses below) < recipe (RECIPES[train.recipe]) < YAML file < command-line overrides

The recipe is chosen by the highest layer that names one (`--recipe`, then the YAML's `train.recipe`, then the
default). A run directory's `config.yaml` is `to_yaml(config)`; `from_yaml` reads it back to an equal config, so
`build_config(config_file=run/"config.yaml")` rebuilds the run's config exactly (the YAML names every field, so
the recipe layer under it changes nothing).
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from bonefrac.errors import BonefracError

CLASS_BALANCE = ("none", "weights", "sampler")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
# float16 autocast needs a CUDA GPU; bfloat16 autocast also runs on CPUs (faster where they have AVX-512 BF16 or
# AMX: +20 % at 224 px and +35 % at 384 px here, docs/PERFORMANCE.md).
GPU_PRECISIONS = ("16-mixed",)
# "full" trains the whole network (with `freeze_epochs`, first the head alone); "linear-probe" caches backbone
# features once and trains only the head (planned: issue 3, item 6).
STRATEGIES = ("full", "linear-probe")
CHANNELS = (1, 3)
AUGMENTATIONS = ("none", "seed", "strong")  # the presets of data/transforms.py


class ConfigError(BonefracError):
    """A config value, key or file that bonefrac cannot use; the message names the key and the choices."""


def default_cache_dir() -> str:
    """~/.cache/bonefrac, expanded."""
    return str(Path("~/.cache/bonefrac").expanduser())


@dataclass
class DataConfig:
    """Where the images are and how they reach the model."""

    # root/{train,val,test}/<class>/, or a list of such folders trained on together, each keeping its own splits
    # (`roots` reads either; one folder is always stored as a string, so older config.yaml files read unchanged).
    root: str | list[str] = ""
    image_size: int = 224  # side of the square letterbox every image is resized into (aspect kept, black pad)
    channels: int = 3  # 1: gray in, the first conv's RGB weights summed; 3: gray copied to RGB
    augment: str = "seed"  # transforms.AUGMENTATIONS
    batch_size: int = 32
    workers: int = 2  # DataLoader worker processes (0: load in the training process); also decoding processes
    cache_dir: str = field(default_factory=default_cache_dir)  # decoded, letterboxed images (data/cache.py)
    class_balance: str = "none"  # "weights": class-weighted loss; "sampler": class-balanced sampling
    # Sample each group of near-copies (manifest.csv `group` column, else the audit's duplicate groups) as often as
    # a single image: 200 rotations of one radiograph then count once, not 200 times.
    group_balance: bool = False
    epoch_size: int = 0  # training images drawn per epoch (0: as many as the train split has)
    # With several data folders: draw each folder equally often, whatever its size (then its classes and groups
    # as class_balance and group_balance say), so a large folder does not teach the model its own look.
    dataset_balance: bool = False
    # Load truncated images (the decoder fills in the missing part) instead of skipping them; the run names them
    # (summary.json), and evaluate, predict and serve of the run load them too unless told otherwise.
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.root, list | tuple):  # a list of one is that folder; of none, no folder
            folders = [str(folder) for folder in self.root]
            self.root = folders if len(folders) > 1 else (folders[0] if folders else "")

    @property
    def roots(self) -> list[str]:
        """The data folders this run trains on: the one place that reads `root` as one folder or several."""
        if isinstance(self.root, list):
            return list(self.root)
        return [self.root] if self.root else []


@dataclass
class ModelConfig:
    """Which network, and which weights it starts from (models/registry.py)."""

    name: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None  # a .safetensors or state-dict file; wins over `pretrained`
    drop_rate: float | None = None  # dropout before the classifier (None: the model's default)


@dataclass
class TrainConfig:
    """How the network is trained. The recipe fields below are set as a group by RECIPES."""

    recipe: str = "adam"
    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    scheduler: str = "none"  # "plateau": ReduceLROnPlateau on val loss
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    early_stopping_patience: int | None = None  # epochs without a lower val loss before stopping; None: never
    freeze_epochs: int = 0  # epochs that train the head alone (backbone frozen, its batch norm statistics too)
    unfreeze_blocks: int = 2  # after freeze_epochs: how many of the backbone's last blocks train with the head
    phase2_lr: float | None = None  # learning rate after freeze_epochs (None: lr)
    label_smoothing: float = 0.0
    precision: str = "32"  # "16-mixed": GPU only; "bf16-mixed": GPU or CPU (weights stay float32)
    seed: int = 0
    strategy: str = "full"
    allow_leakage: bool = False  # train even when the audit finds duplicates across splits; the run is marked leaky
    max_time: str | None = None  # wall-clock limit "DD:HH:MM:SS" (Lightning's format); None: none


@dataclass
class RunConfig:
    """Everything a training run needs; stored as the run directory's config.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The seed projects' recipes, as data: each sets TrainConfig fields on top of the defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # SGD with momentum, learning rate divided by 10 when val loss stalls for 5 epochs, early stopping.
    "sgd-plateau": {
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "plateau",
        "plateau_factor": 0.1,
        "plateau_patience": 5,
        "early_stopping_patience": 10,
        "freeze_epochs": 0,
    },
    # Transfer learning in two phases: the new head alone on a frozen backbone, then the last blocks with it at
    # a 10x lower learning rate, so the pretrained features are adjusted, not overwritten.
    "adam-two-phase": {
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "scheduler": "none",
        "freeze_epochs": 5,
        "unfreeze_blocks": 2,
        "phase2_lr": 1e-5,
    },
    "adam": {
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "scheduler": "none",
        "freeze_epochs": 0,
    },
}

_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def build_config(
    *, config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """defaults < recipe < YAML file < overrides, validated.

    overrides: {"section.field": value}, e.g. {"train.epochs": 3, "data.root": "data/xr"}; None values are
    ignored (an option that was not given). "train.recipe" picks the recipe.
    """
    from_file = _read_yaml_file(config_file) if config_file is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    layered: dict[str, dict[str, Any]] = {name: dict(from_file.get(name, {})) for name in _SECTIONS}
    for key, value in given.items():
        section, name = _split_key(key)
        layered[section][name] = value

    recipe = layered["train"].get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"train.recipe: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    config = RunConfig(train=TrainConfig(**RECIPES[recipe]))
    for section, values in layered.items():
        config = replace(config, **{section: _updated(getattr(config, section), section, values)})
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """ConfigError for a value no run can use (device-dependent checks: `check_device`)."""
    data, model, train = config.data, config.model, config.train
    choices = [
        ("data.channels", data.channels, CHANNELS),
        ("data.augment", data.augment, AUGMENTATIONS),
        ("data.class_balance", data.class_balance, CLASS_BALANCE),
        ("train.recipe", train.recipe, tuple(RECIPES)),
        ("train.optimizer", train.optimizer, OPTIMIZERS),
        ("train.scheduler", train.scheduler, SCHEDULERS),
        ("train.precision", train.precision, PRECISIONS),
        ("train.strategy", train.strategy, STRATEGIES),
    ]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    at_least = [
        ("data.image_size", data.image_size, 8),  # three 2x poolings in the small CNNs
        ("data.batch_size", data.batch_size, 1),
        ("data.workers", data.workers, 0),
        ("data.epoch_size", data.epoch_size, 0),
        ("train.epochs", train.epochs, 1),
        ("train.plateau_patience", train.plateau_patience, 0),
        ("train.freeze_epochs", train.freeze_epochs, 0),
        ("train.unfreeze_blocks", train.unfreeze_blocks, 0),
    ]
    if train.early_stopping_patience is not None:
        at_least.append(("train.early_stopping_patience", train.early_stopping_patience, 0))
    for key, value, low in at_least:
        if value < low:
            raise ConfigError(f"{key}: must be at least {low}, got {value}")
    for key, value in (("train.lr", train.lr), ("train.phase2_lr", train.phase2_lr)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in (
        ("train.label_smoothing", train.label_smoothing),
        ("train.plateau_factor", train.plateau_factor),
        ("model.drop_rate", model.drop_rate),
    ):
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    if train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must not be negative, got {train.weight_decay}")
    if train.max_time is not None and not re.fullmatch(r"\d{2}:\d{2}:\d{2}:\d{2}", train.max_time):
        raise ConfigError(f"train.max_time: expected DD:HH:MM:SS (00:02:30:00 is 2.5 hours), got {train.max_time!r}")


def check_device(config: RunConfig, *, cuda: bool) -> None:
    """ConfigError when the config needs a GPU (mixed precision) and `cuda` says there is none."""
    if config.train.precision in GPU_PRECISIONS and not cuda:
        raise ConfigError(
            f"train.precision: {config.train.precision} needs a CUDA GPU and none is available; "
            "use --precision 32 on the CPU"
        )


def to_yaml(config: RunConfig) -> str:
    """The config as YAML, every field named; `from_yaml(to_yaml(c)) == c`."""
    return yaml.safe_dump(asdict(config), sort_keys=False)


def from_yaml(text: str, *, source: str = "config") -> RunConfig:
    """Read what `to_yaml` wrote (missing fields take their defaults; unknown keys are an error)."""
    raw = _parse_yaml(text, source)
    config = RunConfig()
    for section, values in raw.items():
        config = replace(config, **{section: _updated(getattr(config, section), section, values)})
    validate(config)
    return config


def differences(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every field that differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [(key, flat_old[key], flat_new[key]) for key in flat_old if flat_old[key] != flat_new[key]]


# --- reading and coercing values ----------------------------------------------------------------------------


def _flatten(config: RunConfig) -> dict[str, Any]:
    return {f"{section}.{name}": value for section, values in asdict(config).items() for name, value in values.items()}


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in _SECTIONS or name not in {f.name for f in fields(_SECTIONS[section])}:
        raise ConfigError(_unknown_key_message(key))
    return section, name


def _unknown_key_message(key: str, source: str = "") -> str:
    """'unknown config key 'train.lr_rate' (did you mean train.lr?); keys of train: ...'."""
    known = [f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in fields(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    section = key.partition(".")[0]
    listed = [k for k in known if k.startswith(f"{section}.")] or known
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = f"{source}: " if source else ""
    keys_of = f"keys of {section}" if section in _SECTIONS else "keys"
    return f"{where}unknown config key {key!r}{hint}; {keys_of}: {', '.join(listed)}"


def _read_yaml_file(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, source: str) -> dict[str, dict[str, Any]]:
    """YAML text -> {section: {field: value}}, refusing anything that is not a known section and field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected sections data:, model:, train:, found {type(raw).__name__}")
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown config section {section!r}; sections are {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must map keys to values")
        for name in values:
            if name not in {f.name for f in fields(_SECTIONS[section])}:
                raise ConfigError(_unknown_key_message(f"{section}.{name}", source))
    return raw


def _updated(current: Any, section: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(type(current))
    for name in values:
        if name not in hints:
            raise ConfigError(_unknown_key_message(f"{section}.{name}"))
    coerced = {name: _coerce(f"{section}.{name}", value, hints[name]) for name, value in values.items()}
    return replace(current, **coerced)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type: YAML and argparse give close types (1e-4 in YAML 1.1 is a string, 32 an int)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required")
    if isinstance(value, list | tuple):  # a field that may hold a list (data.root) takes one of its element type
        lists = [t for t in options if typing.get_origin(t) is list]
        if not lists:
            raise ConfigError(f"{key}: expected one value, got the list {value!r}")
        (element,) = typing.get_args(lists[0])
        return [_coerce(key, item, element) for item in value]
    kind = next(t for t in options if t is not type(None) and typing.get_origin(t) is not list)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float | Path) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")

