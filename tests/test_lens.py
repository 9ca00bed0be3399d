"""Tests for jaxnets.data.lens: the ray tracer's physics and the TFDS builder's determinism and features.

Datasets are built into pytest's tmp_path at 16-32 px with tens of examples.
"""

import tempfile

import numpy as np
import pytest

from jaxnets.data import lens, load_dataset

SIZE = 64


def params_row(x=0.0, y=0.0, einstein_radius=20.0, sigma=1.0, sigma2=1.0, theta=0.0):
    return np.array([[x, y, einstein_radius, sigma, sigma2, theta]], np.float32)


def direct_intensity(theta_x, theta_y, p, lens_type):
    """One pixel by the textbook formulas in float64: beta = theta - alpha, rotated elliptical Gaussian."""
    x, y, einstein_radius, sigma, sigma2, angle = (float(v) for v in p)
    r = np.hypot(theta_x, theta_y)
    alpha = einstein_radius / r if lens_type == 0 else einstein_radius**2 / r**2
    beta_x, beta_y = theta_x - alpha * theta_x, theta_y - alpha * theta_y
    dx, dy = beta_x - x, beta_y - y
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    return np.exp(-(u**2) / (2 * sigma**2) - v**2 / (2 * sigma2**2))


@pytest.mark.parametrize("lens_type", [0, 1])
def test_aligned_source_gives_einstein_ring_of_radius_einstein_r(lens_type):
    einstein_radius = 20.0
    image = lens.render(params_row(einstein_radius=einstein_radius), np.array([lens_type]), SIZE)[0, :, :, 0]
    theta_x, theta_y = lens.pixel_grid(SIZE)
    radius = np.hypot(theta_x, theta_y)
    weights = image.astype(np.float64)
    ring_radius = (weights * radius).sum() / weights.sum()
    assert ring_radius == pytest.approx(einstein_radius, abs=0.15)
    # Brightest where |theta| = R_E; dark at the centre and the corners.
    assert abs(radius[image == image.max()] - einstein_radius).max() < 1.0
    assert image[SIZE // 2, SIZE // 2] == 0 and image[0, 0] == 0
    # A full ring, not an arc: every one of 16 directions reaches (nearly) full brightness.
    sector = ((np.arctan2(theta_y, theta_x) + np.pi) / (2 * np.pi) * 16).astype(int) % 16
    assert min(image[sector == k].max() for k in range(16)) >= 240


def test_pixels_match_direct_formula_for_both_lenses():
    rng = np.random.default_rng(3)
    params, lens_types = lens.sample_parameters(rng, 12, SIZE)
    lens_types[:6] = [0, 1, 0, 1, 0, 1]
    images = lens.render(params, lens_types, SIZE)
    theta_x, theta_y = lens.pixel_grid(SIZE)
    rows, cols = rng.integers(0, SIZE, 40), rng.integers(0, SIZE, 40)
    for n in range(len(params)):
        expected = np.round(
            255
            * direct_intensity(
                theta_x[rows, cols].astype(np.float64), theta_y[rows, cols].astype(np.float64), params[n], lens_types[n]
            )
        )
        np.testing.assert_allclose(images[n, rows, cols, 0], expected, atol=1)


def test_orientation_x_right_y_up():
    # SIS: a source at distance b along a direction has its bright image at b + R_E along that direction.
    right = lens.render(params_row(x=8.0, einstein_radius=12.0), np.array([0]), SIZE)[0, :, :, 0]
    up = lens.render(params_row(y=8.0, einstein_radius=12.0), np.array([0]), SIZE)[0, :, :, 0]
    centre = (SIZE - 1) / 2
    row, col = np.unravel_index(np.argmax(right), right.shape)
    assert col - centre == pytest.approx(20, abs=1) and row - centre == pytest.approx(0, abs=1)
    row, col = np.unravel_index(np.argmax(up), up.shape)
    assert centre - row == pytest.approx(20, abs=1) and col - centre == pytest.approx(0, abs=1)


def test_elliptical_source_is_elongated_along_theta():
    # Unlensed far away from a tiny lens: the ellipse's long axis follows theta.
    p = params_row(x=0.0, y=0.0, einstein_radius=1e-3, sigma=8.0, sigma2=2.0, theta=np.pi / 2)
    image = lens.render(p, np.array([1]), SIZE)[0, :, :, 0].astype(float)
    vertical, horizontal = (image.sum(axis=1) > 0).sum(), (image.sum(axis=0) > 0).sum()
    assert vertical > 2.5 * horizontal


def test_sampled_parameters_stay_in_documented_ranges():
    params, lens_types = lens.sample_parameters(np.random.default_rng(0), 20000, 64)
    x, y, einstein_radius, sigma, sigma2, theta = params.T
    assert params.dtype == np.float32 and lens_types.dtype == np.int64
    assert np.abs(x).max() <= 0.12 * 64 and np.abs(y).max() <= 0.12 * 64
    assert 0.10 * 64 <= einstein_radius.min() and einstein_radius.max() <= 0.22 * 64
    assert sigma.min() >= 0.03 * 64 > 1.9  # resolved: never sub-pixel
    assert np.all(sigma2 <= sigma + 1e-5) and np.all(sigma2 >= 0.5 * sigma - 1e-5)
    assert 0 <= theta.min() and theta.max() < np.pi
    assert set(np.unique(lens_types)) == {0, 1} and abs(lens_types.mean() - 0.5) < 0.02


def test_builder_is_deterministic_with_documented_features(tmp_path):
    first = lens.build(16, 20, 6, 5, seed=7, data_dir=str(tmp_path / "a"))
    second = lens.build(16, 20, 6, 5, seed=7, data_dir=str(tmp_path / "b"))
    assert first.builder_config.name == "s16_n20-6-5_seed7"
    files = sorted(p.name for p in first.data_path.iterdir() if "array_record" in p.name)
    assert len(files) == 3
    for name in files:
        assert (first.data_path / name).read_bytes() == (second.data_path / name).read_bytes()

    features = first.info.features
    assert features["image"].shape == (16, 16, 1) and features["image"].np_dtype == np.uint8
    assert features["params"].shape == (6,) and features["params"].np_dtype == np.float32
    assert features["lens"].names == ["sis", "point_mass"]
    sources = first.as_data_source()
    assert {k: len(v) for k, v in sources.items()} == {"train": 20, "validation": 6, "test": 5}

    # The stored validation split is exactly the documented generator's stream (seed 7, split 1).
    images, params, lens_types = lens.generate(6, 16, np.random.SeedSequence(7, spawn_key=(1,)))
    for i in range(6):
        example = sources["validation"][i]
        np.testing.assert_array_equal(example["image"], images[i])
        np.testing.assert_array_equal(example["params"], params[i])
        assert example["lens"] == lens_types[i]


def test_a_build_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
    # TFDS looks an unbuilt dataset up on its GCS bucket through a temporary folder it never removes: one empty
    # /tmp/tmp*tfds per build (tensorflow-datasets 4.9), ~60 per test-suite run before LocalDatasetInfo.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    lens.build(16, 4, 2, 2, data_dir=str(tmp_path / "data"))
    assert list(temporary.iterdir()) == []


def test_other_sizes_get_their_own_cache_and_reload_is_reuse(tmp_path):
    small = load_dataset("lens", image_size=16, num_train=12, num_validation=4, num_test=4, data_dir=str(tmp_path))
    other = load_dataset(
        "lens", image_size=16, num_train=12, num_validation=4, num_test=4, seed=1, data_dir=str(tmp_path)
    )
    bigger = load_dataset("lens", image_size=24, num_train=12, num_validation=4, num_test=4, data_dir=str(tmp_path))
    assert len({small.directory, other.directory, bigger.directory}) == 3
    assert bigger.image_shape == (24, 24, 1) and bigger.splits["train"][0]["image"].shape == (24, 24, 1)
    assert not np.array_equal(small.splits["train"][0]["image"], other.splits["train"][0]["image"])
    mtime = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lens" / "s16_n12-4-4_seed0" / "1.0.0").iterdir()}
    again = load_dataset("lens", image_size=16, num_train=12, num_validation=4, num_test=4, data_dir=str(tmp_path))
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "lens" / "s16_n12-4-4_seed0" / "1.0.0").iterdir()
    } == mtime
    np.testing.assert_array_equal(again.splits["test"][3]["target"], small.splits["test"][3]["target"])


def test_lens_targets_and_classification(tmp_path):
    regression = load_dataset(
        "lens",
        image_size=16,
        num_train=12,
        num_validation=4,
        num_test=4,
        targets=("einsteinR", "x"),
        data_dir=str(tmp_path),
    )
    assert regression.target_names == ("einsteinR", "x") and regression.task == "regression"
    raw = lens.build(16, 12, 4, 4, data_dir=str(tmp_path)).as_data_source()["train"][5]
    np.testing.assert_array_equal(regression.splits["train"][5]["target"], raw["params"][[2, 0]])
    classification = load_dataset(
        "lens", task="classification", image_size=16, num_train=12, num_validation=4, num_test=4, data_dir=str(tmp_path)
    )
    assert classification.num_classes == 2 and classification.target_names == ("sis", "point_mass")
    assert classification.splits["train"][5]["label"] == raw["lens"]
    with pytest.raises(ValueError, match="unknown: sigma3"):
        load_dataset(
            "lens",
            image_size=16,
            num_train=12,
            num_validation=4,
            num_test=4,
            targets=("sigma3",),
            data_dir=str(tmp_path),
        )


def test_bad_lens_options_raise():
    with pytest.raises(ValueError, match="num_test must be a non-negative integer"):
        lens.lens_config(32, 10, 2, -1)
    with pytest.raises(ValueError, match=r"expected params \[N, 6\]"):
        lens.render(np.zeros((2, 5), np.float32), np.zeros(2), 16)
