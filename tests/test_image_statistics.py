"""bench/image_statistics.py: the simple-statistics baseline the README compares the networks with."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("image_statistics", os.path.join(ROOT, "bench", "image_statistics.py"))
image_statistics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_statistics)


def test_the_statistics_of_a_known_image():
    image = np.zeros((4, 4, 1), np.uint8)
    image[0, :2, 0] = 255  # two saturated pixels
    image[1, 0, 0] = 100  # one lit, not bright
    stats = image_statistics.statistics(image)
    flux, lit = np.log1p(610.0), np.log1p(3.0)
    np.testing.assert_allclose(stats, [flux, np.log1p(2.0), lit, 1.0, flux - lit, np.sqrt(2.0)])


def test_a_quadratic_target_is_fitted_exactly_and_noise_not_at_all():
    rng = np.random.default_rng(0)
    stats = rng.normal(size=(400, 3))
    features = image_statistics.quadratic_features(stats)
    quadratic = 1 + 2 * stats[:, 0] - stats[:, 1] * stats[:, 2] + 0.5 * stats[:, 2] ** 2
    assert image_statistics.r2_of_fit(features, quadratic, 300) == pytest.approx(1.0)
    assert image_statistics.r2_of_fit(features, rng.normal(size=400), 300) < 0.1


def test_the_script_reads_both_csv_files_and_refuses_mismatched_ones(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "params.csv").write_text("filename,sigma\nimages/0.png,1\nimages/1.png,2\n")
    (tmp_path / "roulette.csv").write_text("filename,xiX,sigma\nimages/0.png,3,1.5\nimages/1.png,4,2.5\n")
    columns = image_statistics.read_columns(str(tmp_path))
    assert columns == {"filename": ["images/0.png", "images/1.png"], "sigma": ["1.5", "2.5"], "xiX": ["3", "4"]}
    (tmp_path / "roulette.csv").write_text("filename,xiX\nimages/1.png,3\nimages/0.png,4\n")
    with pytest.raises(SystemExit, match="list different images"):
        image_statistics.read_columns(str(tmp_path))
