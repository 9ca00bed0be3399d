import dataclasses
import json

import pytest

from jaxnets import config as config_lib
from jaxnets.config import Config


def test_cli_is_generated_from_the_dataclass_with_its_defaults():
    parser = config_lib.parser("test")
    assert config_lib.from_args(parser.parse_args([])) == Config()
    changed = config_lib.from_args(parser.parse_args(
        ["--lr", "0.01", "--no-standardize", "--model", "mlp", "--head-features", "", "--epochs", "7"]))
    assert (changed.lr, changed.standardize, changed.model, changed.head_features, changed.epochs) == \
        (0.01, False, "mlp", "", 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "hinge"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        config_lib.parser("test").parse_args(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
        assert field.metadata["help"].split()[0] in text


def test_save_and_load_round_trip(tmp_path):
    config = Config(dataset="mnist", model="mlp", lr=3e-4, workdir=str(tmp_path))
    config.save(str(tmp_path))
    assert Config.load(str(tmp_path)) == config
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-4


def test_load_explains_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        Config.load(str(tmp_path))


def test_default_workdir_names_dataset_and_model():
    assert Config().run_dir == "runs/lens-inception3"
    assert Config(data="sims/train.csv", model="mlp").run_dir == "runs/csv-train-mlp"
