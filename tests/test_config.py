from __future__ import annotations

import pytest

from bonefrac.config import (
    RECIPES,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build_config,
    check_device,
    differences,
    from_yaml,
    to_yaml,
)
from bonefrac.run import Run
from bonefrac.shipped import shipped_run


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_recipe_yaml_overrides_in_that_order(tmp_path):
    defaults = build_config()
    assert defaults == RunConfig(train=TrainConfig(**RECIPES["adam"]))
    assert (defaults.train.optimizer, defaults.train.lr, defaults.data.image_size) == ("adam", 1e-4, 224)

    recipe = build_config(overrides={"train.recipe": "sgd-plateau"})
    assert (recipe.train.optimizer, recipe.train.lr, recipe.train.scheduler) == ("sgd", 1e-3, "plateau")

    yaml_file = write(tmp_path, "train:\n  recipe: sgd-plateau\n  lr: 0.01\ndata:\n  batch_size: 8\n")
    from_file = build_config(config_file=yaml_file)
    assert from_file.train.lr == 0.01  # YAML over recipe
    assert from_file.train.optimizer == "sgd"  # recipe over defaults
    assert (from_file.data.batch_size, from_file.data.image_size) == (8, 224)

    overridden = build_config(config_file=yaml_file, overrides={"train.lr": 0.5, "data.batch_size": None})
    assert overridden.train.lr == 0.5  # command line over YAML
    assert overridden.data.batch_size == 8  # an option not given (None) changes nothing

    # A recipe named on the command line replaces the YAML's recipe, but not the YAML's own values.
    other_recipe = build_config(config_file=yaml_file, overrides={"train.recipe": "adam"})
    assert (other_recipe.train.recipe, other_recipe.train.optimizer, other_recipe.train.scheduler) == (
        "adam",
        "adam",
        "none",
    )
    assert other_recipe.train.lr == 0.01


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            "sgd-plateau",
            {
                "optimizer": "sgd",
                "lr": 1e-3,
                "momentum": 0.9,
                "weight_decay": 1e-4,
                "scheduler": "plateau",
                "plateau_factor": 0.1,
                "plateau_patience": 5,
                "freeze_epochs": 0,
            },
        ),
        ("adam-two-phase", {"optimizer": "adam", "lr": 1e-4, "phase2_lr": 1e-5, "scheduler": "none"}),
        ("adam", {"optimizer": "adam", "lr": 1e-4, "scheduler": "none", "freeze_epochs": 0}),
    ],
)
def test_recipes_are_the_seed_projects(recipe, expected):
    train = build_config(overrides={"train.recipe": recipe}).train
    assert {key: getattr(train, key) for key in expected} == expected
    if recipe == "sgd-plateau":
        assert train.early_stopping_patience is not None
    if recipe == "adam-two-phase":
        assert train.freeze_epochs > 0 and train.unfreeze_blocks > 0


def test_yaml_round_trip_is_exact(tmp_path):
    config = RunConfig(
        data=DataConfig(root="/data/xr", image_size=96, channels=1, augment="strong", class_balance="sampler"),
        model=ModelConfig(name="cnn-bn", pretrained=False, weights="/w/model.safetensors", drop_rate=0.3),
        train=TrainConfig(
            recipe="adam-two-phase",
            epochs=7,
            lr=3e-4,
            phase2_lr=1.5e-5,
            label_smoothing=0.1,
            early_stopping_patience=3,
            precision="bf16-mixed",
            allow_leakage=True,
            max_time="00:01:30:00",
        ),
    )
    text = to_yaml(config)
    assert from_yaml(text) == config
    assert build_config(config_file=write(tmp_path, text)) == config  # a run's config.yaml rebuilds the run
    assert to_yaml(from_yaml(text)) == text


def test_yaml_values_are_coerced_to_the_field_types(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string and 32 as an int.
    config = build_config(config_file=write(tmp_path, "train:\n  lr: 1e-4\n  precision: 32\n  epochs: 3.0\n"))
    assert (config.train.lr, config.train.precision, config.train.epochs) == (1e-4, "32", 3)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("train:\n  learning_rate: 0.1\n", "train.learning_rate"),
        ("optimizer:\n  lr: 0.1\n", "optimizer"),
        ("data:\n  image_size: 64\n  grayscale: true\n", "data.grayscale"),
    ],
)
def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named) as caught:
        build_config(config_file=write(tmp_path, text))
    assert "config.yaml" in str(caught.value)


def test_unknown_override_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"'train\.epoch'.*did you mean train\.epochs"):
        build_config(overrides={"train.epoch": 3})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"data.channels": 2}, "data.channels"),
        ({"data.augment": "heavy"}, "data.augment"),
        ({"train.recipe": "adamw-magic"}, "train.recipe"),
        ({"train.epochs": "many"}, "train.epochs"),
        ({"train.epochs": 0}, "train.epochs"),
        ({"train.lr": -1.0}, "train.lr"),
        ({"train.label_smoothing": 1.0}, "train.label_smoothing"),
        ({"train.precision": "16"}, "train.precision"),
        ({"train.max_time": "2h"}, "train.max_time"),
    ],
)
def test_bad_values_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build_config(overrides=overrides)


def test_float16_needs_a_gpu_and_bfloat16_does_not():
    config = build_config(overrides={"train.precision": "16-mixed"})
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_device(config, cuda=False)
    check_device(config, cuda=True)
    check_device(build_config(), cuda=False)
    check_device(build_config(overrides={"train.precision": "bf16-mixed"}), cuda=False)  # CPU autocast


def test_differences_lists_changed_keys():
    old = build_config()
    new = build_config(overrides={"train.lr": 0.5, "data.batch_size": 4})
    assert differences(old, new) == [("data.batch_size", 32, 4), ("train.lr", 1e-4, 0.5)]
    assert differences(old, old) == []


def test_data_root_is_one_folder_or_several_and_one_reads_as_before():
    shipped = Run.load(shipped_run()).config  # its config.yaml: written before data.root could be a list
    assert shipped.data.root == "fracatlas-grouped (not shipped)" and shipped.data.roots == [shipped.data.root]
    assert "root: fracatlas-grouped (not shipped)\n" in to_yaml(shipped) and from_yaml(to_yaml(shipped)) == shipped

    several = build_config(overrides={"data.root": ["/d/a", "/d/b"]})
    assert several.data.roots == ["/d/a", "/d/b"] and from_yaml(to_yaml(several)) == several
    assert "root:\n  - /d/a\n  - /d/b\n" in to_yaml(several)
    one = build_config(overrides={"data.root": ["/d/a"]})  # `bonefrac train DATA` gives a list of one
    assert one.data.root == "/d/a" and one == build_config(overrides={"data.root": "/d/a"})
    with pytest.raises(ConfigError, match=r"train\.lr: expected one value"):
        build_config(overrides={"train.lr": [1e-3, 1e-4]})
