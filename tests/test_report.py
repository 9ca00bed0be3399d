"""jaxnets.report: residuals (circular for angles), the predictions plot's panels, the predictions CSV."""

import csv

import numpy as np
from matplotlib import image as mpimg

from jaxnets import metrics, report


def angle_report(true, predicted):
    return metrics.regression_report(true, predicted, ["x", "theta"], periods=(None, 180.0))


def test_residuals_are_predicted_minus_true_and_the_short_way_round_for_angles():
    true = np.array([[1.0, 179.0], [2.0, 10.0]], np.float32)
    predicted = np.array([[1.5, 1.0], [1.0, 170.0]], np.float32)
    np.testing.assert_allclose(
        report.residuals(true, predicted, angle_report(true, predicted)), [[0.5, 2.0], [-1.0, -20.0]]
    )


def test_predictions_plot_has_a_scatter_and_a_residual_panel_per_parameter(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 180, size=(50, 3)).astype(np.float32)
    predicted = true + rng.normal(size=true.shape).astype(np.float32)
    summary = metrics.regression_report(true, predicted, ["a", "b", "theta"], periods=(None, None, 180.0))
    report.plot_predictions(str(tmp_path / "p.png"), true, predicted, summary)
    # Three parameters: two per row, each a pair of panels 3.5 x 3.3 inches at 100 dpi -> 2 rows of 4 panels.
    assert mpimg.imread(tmp_path / "p.png").shape[:2] == (660, 1400)


def test_predictions_csv_names_each_examples_file(tmp_path):
    path = str(tmp_path / "p.csv")
    true, predicted = np.array([[1.0], [2.0]]), np.array([[1.5], [2.5]])
    report.write_predictions(path, np.array([1, 0]), true, predicted, ["x"], ["image-0.png", "image-1.png"])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"index": "1", "filename": "image-1.png", "x (true)": "1", "x (predicted)": "1.5"},
        {"index": "0", "filename": "image-0.png", "x (true)": "2", "x (predicted)": "2.5"},
    ]
