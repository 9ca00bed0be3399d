"""evaluate.py's work (jaxnets.evaluation): reports from a saved run, the weights it evaluates with."""

import csv

import numpy as np
import pytest

from conftest import tiny_config
from jaxnets import evaluation, experiment, training
from jaxnets.data import pipeline


def test_classification_run_reports_accuracy_and_confusion(tmp_path):
    config = tiny_config(tmp_path, task="classification", epochs=1)
    experiment.train_and_evaluate(config)
    report = evaluation.evaluate_run(config.run_dir, split="test")
    assert report["task"] == "classification" and report["count"] == 20
    assert sum(map(sum, report["confusion_matrix"])) == 20
    assert set(report["per_class_accuracy"]) == {"sis", "point_mass"}
    with open(tmp_path / "run" / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = np.array([float(r["label (predicted)"]) for r in rows])
    true = np.array([float(r["label (true)"]) for r in rows])
    assert report["accuracy"] == pytest.approx(np.mean(predicted == true))


def test_ema_run_validates_and_evaluates_with_the_average(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, ema=0.5)
    history = experiment.train_and_evaluate(config)["history"]
    # evaluate.py restores the best checkpoint and must see the averaged weights that validation saw.
    report = evaluation.evaluate_run(config.workdir, split="validation")
    assert report["validation_loss"] == min(h["validation_loss"] for h in history)
    assert report["loss"] == pytest.approx(report["validation_loss"], rel=1e-5)
    monkeypatch.setattr(training, "with_ema_params", lambda state: state)  # the raw weights instead
    assert evaluation.evaluate_run(config.workdir, split="validation")["loss"] != pytest.approx(
        report["loss"], rel=1e-3
    )


def test_evaluation_reads_the_images_on_the_run_s_pixel_scale(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, pixel_scale="log")
    history = experiment.train_and_evaluate(config)["history"]
    report = evaluation.evaluate_run(config.workdir, split="validation")
    assert report["loss"] == pytest.approx(min(h["validation_loss"] for h in history), rel=1e-5)
    monkeypatch.setitem(pipeline.PIXEL_SCALES, "log", pipeline.PIXEL_SCALES["linear"])  # the other scale instead
    assert evaluation.evaluate_run(config.workdir, split="validation")["loss"] != pytest.approx(
        report["loss"], rel=1e-3
    )


def test_per_view_undoes_the_batch_by_batch_view_by_view_order():
    # Two batches of 2 and 1 real rows, 3 views: rows ordered batch, view, row; each value 100 * view + 10 * row
    # within its view's predictions.
    first = [[100 * view + row] for view in range(3) for row in range(2)]
    second = [[100 * view + 20] for view in range(3)]
    views = evaluation.per_view(np.array(first + second), [2, 1], 3)
    assert [v.tolist() for v in views] == [[[0], [1], [20]], [[100], [101], [120]], [[200], [201], [220]]]
    assert [v.shape for v in evaluation.per_view(np.zeros((0, 4)), [], 8)] == [(0, 4)] * 8  # an empty split
