import dataclasses
import json

import pytest

from jaxnets import config as config_lib
from jaxnets.config import Config


def test_cli_is_generated_from_the_dataclass_with_its_defaults():
    parser = config_lib.parser("test")
    assert config_lib.from_args(parser.parse_args([])) == Config()
    changed = config_lib.from_args(
        parser.parse_args(
            [
                "--lr",
                "0.01",
                "--no-standardize",
                "--model",
                "mlp",
                "--head-features",
                "",
                "--epochs",
                "7",
                "--hidden",
                "64, 32",
                "--targets",
                "x,einsteinR",
            ]
        )
    )
    assert (changed.lr, changed.standardize, changed.model, changed.head_features, changed.epochs) == (
        0.01,
        False,
        "mlp",
        (),
        7,
    )
    assert (changed.hidden, changed.targets) == ((64, 32), ("x", "einsteinR"))  # typed once, at the CLI
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "hinge"])


def test_a_bad_list_entry_is_named(capsys):
    with pytest.raises(SystemExit):
        config_lib.parser("test").parse_args(["--hidden", "64,sixty"])
    assert "'sixty' in '64,sixty' is not a valid int" in capsys.readouterr().err


def test_help_shows_list_defaults_as_typed():
    text = " ".join(config_lib.parser("test").format_help().split())  # unwrapped
    assert "(default: 512,256)" in text and "(default: 1024,512)" in text


def test_resume_fields_are_marked_on_the_fields():
    fields = Config.resume_fields()
    assert {"dataset", "model", "hidden", "batch_size", "seed", "image_size"} <= set(fields)
    assert not {"lr", "epochs", "schedule", "workdir", "data_dir", "compilation_cache"} & set(fields)


def test_library_defaults_are_the_config_defaults():
    import inspect

    from jaxnets import data
    from jaxnets.data import lens

    defaults = Config()
    signature = inspect.signature(data.load_dataset).parameters
    for name in ("dataset", "image_size", "num_train", "num_validation", "num_test", "seed", "drop_incomplete"):
        assert signature[name].default == getattr(defaults, name)
        if name in ("num_train", "num_validation", "num_test", "seed"):
            assert inspect.signature(lens.build).parameters[name].default == getattr(defaults, name)
    # No --image-size: the lens images are rendered at the side the config module names.
    assert inspect.signature(lens.build).parameters["image_size"].default == config_lib.LENS_IMAGE_SIZE


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        config_lib.parser("test").parse_args(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
        assert field.metadata["help"].split()[0] in text


def test_save_and_load_round_trip(tmp_path):
    config = Config(dataset="mnist", model="mlp", lr=3e-4, hidden=(64, 32), targets=("x", "y"), workdir=str(tmp_path))
    config.save(str(tmp_path))
    assert Config.load(str(tmp_path)) == config
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["lr"], saved["hidden"], saved["targets"]) == (3e-4, [64, 32], ["x", "y"])


def test_configs_saved_with_comma_strings_still_load(tmp_path):
    # Runs saved before list options were typed hold "512,256" and "": they resume unchanged.
    values = json.loads(Config().to_json())
    values.update(hidden="64,32", head_features="", targets="x,y")
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = Config.load(str(tmp_path))
    assert (loaded.hidden, loaded.head_features, loaded.targets) == ((64, 32), (), ("x", "y"))


def test_runs_saved_before_target_weights_and_angle_axes_keep_their_encoding(tmp_path):
    values = json.loads(Config().to_json())
    assert values["target_weights"] is None and values["angle_axes"] is None  # a new run: the dataset's defaults
    del values["target_weights"]
    del values["angle_axes"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert Config.load(str(tmp_path)).target_weights == ()  # no weights, as it was trained
    assert Config.load(str(tmp_path)).angle_axes == ()  # and angles as plain (cos, sin)
    assert {"target_weights", "angle_axes"} <= set(Config.resume_fields())


def test_runs_saved_before_the_pixel_scale_keep_linear_pixels(tmp_path):
    """CosmoSim runs now default to the log scale; one saved before the option existed was trained on v / 255."""
    values = json.loads(Config().to_json())
    assert values["pixel_scale"] is None  # a new run: the dataset's default
    del values["pixel_scale"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert Config.load(str(tmp_path)).pixel_scale == "linear"
    assert "pixel_scale" in Config.resume_fields()


def test_load_explains_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        Config.load(str(tmp_path))


def test_default_workdir_names_dataset_and_model():
    assert Config().run_dir == "runs/lens-inception3"
    assert Config(data=("sims/train.csv",), model="mlp").run_dir == "runs/csv-train-mlp"
    assert Config(data=("sims/params.csv", "sims/roulette.csv")).run_dir == "runs/csv-params-inception3"
