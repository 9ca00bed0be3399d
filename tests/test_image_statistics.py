"""bench/image_statistics.py: the simple-statistics baseline docs/cosmosim_runs.md compares the networks with."""

import csv
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from jaxnets.config import Config

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
    targets = np.stack([quadratic, rng.normal(size=400)], axis=1)
    predicted = features[300:] @ image_statistics.fit(features[:300], targets[:300])
    np.testing.assert_allclose(predicted[:, 0], quadratic[300:], atol=1e-9)
    noise = targets[300:, 1]
    assert 1 - np.mean((predicted[:, 1] - noise) ** 2) / np.var(noise) < 0.1


def write_run(folder, num_rows=80):
    """A CosmoSim-style CSV of blobs whose `flux` column is a quadratic in the image statistics, `noise` is not,
    and a run folder whose config.json names it; returns the run folder."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(num_rows):
        pixels = np.zeros((16, 16), np.uint8)
        size, value = rng.integers(1, 10), rng.integers(20, 256)
        pixels[:size, : rng.integers(1, 10)] = value
        Image.fromarray(pixels, "L").save(folder / "images" / f"image-{i}.png")
        stats = image_statistics.statistics(pixels[:, :, None])
        rows.append([f"images/image-{i}.png", 3 * stats[0] - stats[2] * stats[4] + 1, rng.normal()])
    with open(folder / "roulette.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "flux", "noise"])
        writer.writerows(rows)
    run = folder / "run"
    csv_file = str(folder / "roulette.csv")
    Config(data=(csv_file,), targets=("flux", "noise"), data_dir=str(folder / "tfds"), workdir=str(run)).save(str(run))
    return run


def test_the_fit_uses_the_runs_own_split_and_reports_each_split(tmp_path, capsys):
    run = write_run(tmp_path)
    reports = image_statistics.baseline(Config.load(str(run)))
    assert set(reports) == {"validation", "test"}
    for report in reports.values():
        assert report["count"] == 8  # 10 % of 80 rows each, the split train.py makes
        assert report["parameters"]["flux"]["r2"] == pytest.approx(1.0, abs=1e-4)
        assert report["parameters"]["noise"]["r2"] < 0.5

    assert image_statistics.main([str(run), "--splits", "test"]) == 0
    out = capsys.readouterr().out
    assert "predicted: test 8" in out
    table = out[out.index("R²") :].splitlines()
    assert table[0].split() == ["R²", "test"]
    assert [line.split()[0] for line in table[1:]] == ["flux", "noise", "uniform"]
    assert float(table[1].split()[1]) == pytest.approx(1.0, abs=1e-3)


def test_a_folder_without_a_run_or_a_missing_split_gets_a_message(tmp_path, capsys):
    assert image_statistics.main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    run = write_run(tmp_path / "data")
    assert image_statistics.main([str(run), "--splits", "holdout"]) == 2
    assert "has no split 'holdout'" in capsys.readouterr().err
