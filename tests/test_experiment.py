"""End to end: train.py and evaluate.py on a tiny lens run, resume, and refusal of incompatible runs."""

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import TINY, cli_args, run_script
from jaxnets import experiment, training
from jaxnets.checkpoint import Checkpointer
from jaxnets.config import Config
from jaxnets.data import pipeline


def tiny_config(tmp_path, **changes):
    return Config(**{**TINY, "workdir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"), **changes})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    workdir, data_dir = tmp / "run", tmp / "data"
    trained = run_script("train.py", *cli_args(**TINY, workdir=workdir, data_dir=data_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_script("evaluate.py", "--workdir", workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return workdir, trained.stdout, evaluated.stdout


@pytest.mark.slow
def test_train_prints_the_seed_lines_and_writes_the_run(finished_run):
    workdir, stdout, _ = finished_run
    assert "Epoch 1: Loss = " in stdout and "Epoch 2: Loss = " in stdout
    history = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["validation_loss"]) for h in history)
    assert (workdir / "loss_curve.png").stat().st_size > 1000
    assert Config.load(str(workdir)).model == "mlp"


@pytest.mark.slow
def test_evaluate_report_matches_its_predictions(finished_run):
    workdir, _, stdout = finished_run
    report = json.loads((workdir / "eval_test.json").read_text())
    assert report["count"] == 20 and report["split"] == "test"
    assert "R²" in stdout and "einsteinR" in stdout
    with open(workdir / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == list(range(20))  # every example, once
    # The (true) column is the dataset's own raw parameters: standardisation (and the angle encoding) undone.
    test_split = experiment.load_data(Config.load(str(workdir))).splits["test"]
    names = list(report["parameters"])
    for r in rows:
        expected = test_split[int(r["index"])]["target"]
        np.testing.assert_allclose([float(r[f"{n} (true)"]) for n in names], expected, rtol=1e-6)
    assert report["parameters"]["theta"]["period"] == pytest.approx(np.pi)  # the lens theta is an angle
    for name, values in report["parameters"].items():
        true = np.array([float(r[f"{name} (true)"]) for r in rows])
        predicted = np.array([float(r[f"{name} (predicted)"]) for r in rows])
        error, spread = predicted - true, true - true.mean()
        if "period" in values:  # the shorter way round, and deviations from the circular mean
            period = values["period"]
            error = (error + period / 2) % period - period / 2
            turn = true * 2 * np.pi / period
            mean = np.arctan2(np.sin(turn).mean(), np.cos(turn).mean()) * period / (2 * np.pi)
            spread = (true - mean + period / 2) % period - period / 2
        r2 = 1 - np.sum(error**2) / np.sum(spread**2)
        assert values["r2"] == pytest.approx(r2, rel=1e-4, abs=1e-5)
        assert values["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-4)
    assert (workdir / "predictions_test.png").stat().st_size > 1000


def _params(workdir):
    config = Config.load(str(workdir))
    dataset = experiment.load_data(config)
    template = training.TrainState.create(
        experiment.build_model(config, dataset), experiment.build_optimizer(config, 6)
    )
    state, _ = Checkpointer(str(workdir), read_only=True).restore(template)
    return jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)


def test_resume_gives_identical_parameters_and_history(tmp_path):
    straight = tiny_config(tmp_path, workdir=str(tmp_path / "straight"))
    experiment.train_and_evaluate(straight)
    split = tiny_config(tmp_path, workdir=str(tmp_path / "split"), epochs=1)
    experiment.train_and_evaluate(split)
    experiment.train_and_evaluate(dataclasses.replace(split, epochs=2))
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "split"), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = [[json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("straight", "split")]
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1])


def test_incompatible_workdir_is_refused_with_the_differences(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    experiment.train_and_evaluate(config)
    with pytest.raises(experiment.RunError, match=r"hidden: saved 32, requested 64.*--workdir"):
        experiment.train_and_evaluate(dataclasses.replace(config, hidden=(64,)))


def test_classification_run_reports_accuracy_and_confusion(tmp_path):
    config = tiny_config(tmp_path, task="classification", epochs=1)
    experiment.train_and_evaluate(config)
    report = experiment.evaluate_run(config.run_dir, split="test")
    assert report["task"] == "classification" and report["count"] == 20
    assert sum(map(sum, report["confusion_matrix"])) == 20
    assert set(report["per_class_accuracy"]) == {"sis", "point_mass"}
    with open(tmp_path / "run" / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = np.array([float(r["label (predicted)"]) for r in rows])
    true = np.array([float(r["label (true)"]) for r in rows])
    assert report["accuracy"] == pytest.approx(np.mean(predicted == true))


@pytest.mark.parametrize(
    "changes",
    [
        dict(schedule="cosine"),
        dict(schedule="plateau"),
        dict(weight_decay=0.1),
        dict(on_nan="skip"),
        dict(precision="bf16"),
    ],
)
def test_every_optimizer_option_trains(tmp_path, changes):
    config = tiny_config(tmp_path, **changes)
    dataset = experiment.load_data(config)
    state = training.TrainState.create(
        experiment.build_model(config, dataset), experiment.build_optimizer(config, steps_per_epoch=6)
    )
    mesh = training.data_mesh()
    step = training.make_train_step(experiment.loss_function(config, dataset))
    batches = list(pipeline.batches(dataset, "train", 16, train=True, epoch=1, encoding=dataset.target_encoding()))
    losses_seen = []
    for _ in range(4):
        for batch in batches:
            state, metrics = step(state, training.shard_batch(batch, mesh))
        losses_seen.append(training.summarize(metrics)["loss"])
    assert int(state.step) == 4 * len(batches)
    assert np.isfinite(losses_seen).all() and losses_seen[-1] < losses_seen[0]
