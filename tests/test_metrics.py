import numpy as np
import pytest

from jaxnets import metrics
from jaxnets.report import format_report


def test_regression_report_closed_form():
    true = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 4.0], [3.0, 2.0]])
    predicted = true + np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 1.0]])
    report = metrics.regression_report(true, predicted, ["a", "b"])
    a, b = report["parameters"]["a"], report["parameters"]["b"]
    assert a["mae"] == 1.0 and a["mae_std"] == 0.0 and a["bias"] == 0.0 and a["bias_std"] == 1.0
    assert a["rmse"] == 1.0 and a["r2"] == pytest.approx(1 - 4 / 5)
    assert b["mae"] == 0.25 and b["bias"] == 0.25 and b["r2"] == pytest.approx(1 - 1 / 6)
    assert report["mse"] == pytest.approx(5 / 8) and report["mae"] == pytest.approx(5 / 8)
    assert report["count"] == 4


def test_perfect_predictions_have_r2_one():
    true = np.random.default_rng(0).normal(size=(10, 3))
    report = metrics.regression_report(true, true.copy(), ["x", "y", "z"])
    assert all(p["r2"] == 1.0 and p["rmse"] == 0.0 for p in report["parameters"].values())


def test_classification_report():
    labels = np.array([0, 0, 1, 1, 1, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 0, 2]]
    report = metrics.classification_report(labels, logits, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class_accuracy"] == {"a": 0.5, "b": pytest.approx(2 / 3), "c": 1.0}
    assert report["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\[examples, 2\].*\(3, 2\).*\(3, 1\)"):
        metrics.regression_report(np.zeros((3, 2)), np.zeros((3, 1)), ["a", "b"])


def test_an_angle_is_also_judged_over_the_elongated_sources_only():
    # sigma2/sigma: 0.5 and 0.8 are elongated, 0.9 is not; the angle errors there are 10, 20 and 90 degrees.
    true = np.array([[2.0, 1.0, 0.0], [1.0, 0.8, 90.0], [1.0, 0.9, 45.0]])
    predicted = true + np.array([[0.0, 0.0, 10.0], [0.0, 0.0, -20.0], [0.0, 0.0, 90.0]])
    report = metrics.regression_report(true, predicted, ["sigma", "sigma2", "theta"], periods=(None, None, 180.0))
    assert report["parameters"]["theta"]["elongated"] == {
        "axis_ratio_max": 0.8,
        "count": 2,
        "mae": 15.0,
        "rmse": pytest.approx(np.sqrt(250.0)),
    }
    assert report["parameters"]["theta"]["mae"] == pytest.approx(40.0)
    assert "theta over the 2 elongated sources (axis ratio sigma2/sigma <= 0.8): MAE 15" in format_report(report)
    assert (
        "elongated"
        not in metrics.regression_report(true, predicted, ["a", "b", "theta"], periods=(None, None, 180.0))[
            "parameters"
        ]["theta"]
    )
