from __future__ import annotations

import numpy as np
import pytest
import torch

from bonefrac.data.transforms import (
    AUGMENTATIONS,
    EvalPreset,
    RandomCLAHE,
    TrainPreset,
    batch_mixer,
    letterbox,
)

from .conftest import smooth_image

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cached_image(size: int = 64) -> np.ndarray:
    """What the cache hands the presets: uint8 (size, size), asymmetric, so any flip or warp shows."""
    return np.array(smooth_image(7, size))


# --- letterbox -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((80, 40), slice(0, 64), slice(16, 48)),  # tall: 64 high, 32 wide, centred left-right
        ((40, 80), slice(16, 48), slice(0, 64)),  # wide: centred top-bottom
        ((50, 50), slice(0, 64), slice(0, 64)),  # square: fills the frame (upscaled)
        ((200, 200), slice(0, 64), slice(0, 64)),  # square: fills the frame (downscaled)
    ],
)
def test_letterbox_places_content_centred_on_black(shape, rows, cols):
    out = letterbox(np.ones(shape, dtype=np.float32), 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[rows, cols] = 255
    np.testing.assert_array_equal(out, expected)


def test_letterbox_keeps_gray_levels_exact():
    out = letterbox(np.full((30, 60), 0.5, dtype=np.float32), 64)
    assert set(np.unique(out)) == {0, 128}  # 127.5 rounds to the even 128; the pad stays 0


@pytest.mark.parametrize("shape", [(37, 100), (100, 37), (31, 29), (300, 7), (2, 90), (63, 64)])
def test_letterbox_keeps_aspect_ratio_within_one_pixel(shape):
    out = letterbox(np.ones(shape, dtype=np.float32), 64)
    filled_rows, filled_cols = np.nonzero(out.any(axis=1))[0], np.nonzero(out.any(axis=0))[0]
    height, width = len(filled_rows), len(filled_cols)
    assert max(height, width) == 64
    assert abs(height - 64 * shape[0] / max(shape)) <= 1 and abs(width - 64 * shape[1] / max(shape)) <= 1
    assert np.all(out[filled_rows[0] : filled_rows[-1] + 1, filled_cols[0] : filled_cols[-1] + 1] == 255)
    # Centred: the pads on either side differ by at most one pixel.
    assert abs(filled_cols[0] - (63 - filled_cols[-1])) <= 1 and abs(filled_rows[0] - (63 - filled_rows[-1])) <= 1


def test_letterbox_rejects_colour_arrays():
    with pytest.raises(ValueError, match="2-D"):
        letterbox(np.ones((8, 8, 3), dtype=np.float32), 64)


# --- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel", "mean", "std", "channels", "expected"),
    [
        (255, HALF, HALF, 3, [1.0, 1.0, 1.0]),
        (0, HALF, HALF, 1, [-1.0]),
        (51, IMAGENET_MEAN, IMAGENET_STD, 3, [(0.2 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]),
        # One channel: the average mean and std (the model sums its first conv's RGB weights).
        (51, IMAGENET_MEAN, IMAGENET_STD, 1, [(0.2 - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)]),
    ],
)
def test_eval_preset_normalises_exactly(pixel, mean, std, channels, expected):
    out = EvalPreset(mean=mean, std=std, channels=channels)(np.full((32, 32), pixel, dtype=np.uint8))
    assert out.shape == (channels, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
    torch.testing.assert_close(out, torch.tensor(expected).view(-1, 1, 1).expand_as(out))


def test_eval_preset_is_deterministic_and_replicates_gray():
    image = cached_image()
    preset = EvalPreset(mean=HALF, std=HALF, channels=3)
    torch.manual_seed(0)
    first = preset(image)
    torch.manual_seed(1)
    assert torch.equal(preset(image), first)
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    torch.testing.assert_close(first[0], torch.from_numpy(image).float() / 255 * 2 - 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_train_preset_none_is_the_eval_preset(channels):
    image = cached_image()
    train = TrainPreset(augment="none", mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=channels, image_size=64)
    evaluate = EvalPreset(mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=channels)
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(train(image), evaluate(image))


@pytest.mark.parametrize("augment", ["seed", "strong"])
@pytest.mark.parametrize("channels", [1, 3])
def test_random_presets_vary_keep_the_contract_and_follow_torch_seed(augment, channels):
    image = cached_image()
    train = TrainPreset(augment=augment, mean=HALF, std=HALF, channels=channels, image_size=64)
    plain = EvalPreset(mean=HALF, std=HALF, channels=channels)(image)
    outputs = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = train(image)
        assert out.shape == (channels, 64, 64) and out.dtype == torch.float32 and type(out) is torch.Tensor
        assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
        outputs.append(out)
    assert any(not torch.equal(out, plain) for out in outputs)
    assert not torch.equal(outputs[0], outputs[1])
    torch.manual_seed(2)
    assert torch.equal(train(image), outputs[2])


def test_presets_reject_unknown_settings():
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'"):
        TrainPreset(augment="heavy", mean=HALF, std=HALF, image_size=64)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        EvalPreset(mean=HALF, std=HALF, channels=2)
    assert AUGMENTATIONS == ("none", "seed", "strong")


def test_clahe_raises_local_contrast_and_honours_p():
    # A dim, flat image (gray 100-140) gets spread out; it stays a float image in [0, 1].
    image = torch.from_numpy(100 + np.array(smooth_image(3, 64)) * 40 // 255).float().div(255)[None]
    assert torch.equal(RandomCLAHE(p=0.0)(image), image)
    out = RandomCLAHE(p=1.0)(image)
    assert out.shape == image.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert out.std() > 1.5 * image.std()


# --- batch mixing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 5])
def test_strong_batch_mixer_gives_soft_targets(num_classes):
    mixer = batch_mixer("strong", num_classes)
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6) % num_classes
    for seed in range(4):  # MixUp or CutMix, whichever the seed picks
        torch.manual_seed(seed)
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape and targets.shape == (6, num_classes)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
        assert (targets >= 0).all()


@pytest.mark.parametrize("augment", ["none", "seed"])
def test_other_presets_mix_nothing(augment):
    assert batch_mixer(augment, 2) is None
