"""bench/amplitude_ceiling.py: the amplitudes' R² ceiling when the closest lens configurations are not resolved."""

import importlib.util
import os

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("amplitude_ceiling", os.path.join(ROOT, "bench", "amplitude_ceiling.py"))
amplitude_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(amplitude_ceiling)


def test_the_ceiling_in_closed_form():
    one_outlier = np.array([[0.0], [0.0], [0.0], [10.0]])
    # Alone under the threshold, the outlier is its own mean: nothing is lost.
    np.testing.assert_allclose(amplitude_ceiling.ceiling(one_outlier, np.array([0, 0, 0, 1], bool)), [1.0])
    # Two rows of opposite sign under it are both predicted 0: squared error 2 / 4 against a variance of 1 / 2.
    pair = np.array([[1.0, 2.0], [-1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(amplitude_ceiling.ceiling(pair, np.array([1, 1, 0, 0], bool)), [0.0, 1.0])
    np.testing.assert_allclose(amplitude_ceiling.ceiling(pair, np.zeros(4, bool)), [1.0, 1.0])


def test_the_distance_to_the_nearest_lens_of_one_lens_and_of_a_cluster():
    roulette = pd.DataFrame({"xiX": [13.0, 2.0], "xiY": [14.0, 0.0], "lensX": [10.0, 0.0], "lensY": [10.0, 0.0]})
    single = pd.DataFrame({"einsteinradius": [20.0, 30.0]})
    np.testing.assert_allclose(amplitude_ceiling.nearest_lens_distance(single, roulette), [5.0, 2.0])
    cluster = pd.DataFrame({"cluster": ["SIE/3/4/10/0.5/20;SIE/-30/0/10/0.5/20", "SIS/40/0/7;SIS/-1/0/7"]})
    # Row 0: the point (3, 4) is on the first lens; row 1: (2, 0) is 3 from the second.
    np.testing.assert_allclose(amplitude_ceiling.nearest_lens_distance(cluster, roulette), [0.0, 3.0])


def write_simulation(folder, distances):
    """A one-lens simulation whose image points lie `distances` from the lens, with one amplitude that is large
    only on the closest image and one that is always 0 (dropped)."""
    folder.mkdir()
    names = [f"images/image-{i:06d}.png" for i in range(len(distances))]
    pd.DataFrame({"filename": names, "einsteinradius": 10.0}).to_csv(folder / "params.csv", index=False)
    amplitude = np.where(np.asarray(distances) == min(distances), 100.0, 1.0)
    roulette = {"filename": names[::-1], "xiX": distances[::-1], "xiY": 0.0, "lensX": 0.0, "lensY": 0.0}
    roulette |= {"alpha[4][1]": amplitude[::-1], "beta[1][0]": 0.0}
    pd.DataFrame(roulette).to_csv(folder / "roulette.csv", index=False)


def test_the_table_by_threshold_in_the_networks_pixels(tmp_path, capsys):
    # In CosmoSim's pixels; at crop 256 and 128 px one network pixel is two of them: 1.5, 5, 10 and 20 px.
    write_simulation(tmp_path / "sim", [3.0, 10.0, 20.0, 40.0])
    rows = amplitude_ceiling.ceilings(str(tmp_path / "sim"), 2.0, thresholds=(1.0, 2.0))
    assert [(row["images"], row["share"]) for row in rows] == [(0, 0.0), (1, 0.25)]
    assert rows[0]["ceiling"] == 1.0 and rows[1]["ceiling"] == pytest.approx(1.0)  # one row: its own mean

    assert amplitude_ceiling.main([str(tmp_path / "sim"), "--image-size", "64"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "pixels at 64 px" in table[0]
    assert table[1].split() == ["under", "(px)", "images", "share", "ceiling"]
    assert table[2].split() == ["1", "1", "25.0%", "1.000"]  # 3 of CosmoSim's pixels is 0.75 px at 64 px
    assert [line.split()[1] for line in table[3:]] == ["1", "2", "2", "2", "3", "3", "3"]  # 2.5, 5, 10 px
    # Under 3 px the rows of 100 and 1 are both predicted 50.5: squared error 2 * 49.5² / 4 against the variance of
    # (100, 1, 1, 1).
    expected = 1 - (2 * 49.5**2 / 4) / np.var([100.0, 1.0, 1.0, 1.0])
    assert float(table[4].split()[3]) == pytest.approx(expected, abs=5e-4)


def test_a_folder_without_the_simulation_gets_a_clear_message(tmp_path, capsys):
    assert amplitude_ceiling.main([str(tmp_path)]) == 2
    assert "params.csv" in capsys.readouterr().err
