"""Target encoding: angles as (cos, sin), amplitudes in polar form, standardisation, and back; circular errors in the
reports."""

import math
import re

import numpy as np
import pytest

from jaxnets import metrics
from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry
from jaxnets.data.targets import (
    COSMOSIM_ANGLES,
    TargetEncoding,
    parse_angles,
    parse_axis_ratios,
    parse_weights,
    roulette_pairs,
)


def test_angles_round_trip_through_cos_and_sin():
    rng = np.random.default_rng(0)
    targets = np.stack([rng.normal(5, 2, 200), rng.uniform(0, 180, 200), rng.uniform(0, math.pi, 200)], axis=1)
    encoding = TargetEncoding.fit(["x", "theta", "phi"], {"theta": 180.0, "phi": math.pi}, targets, standardize=True)
    assert encoding.width == 5 and encoding.encoded_names == ("x", "theta cos", "theta sin", "phi cos", "phi sin")
    assert encoding.encode(targets.astype(np.float32)).dtype == np.float32  # what the pipeline feeds
    encoded = encoding.encode(targets)
    assert encoded.shape == (200, 5) and encoded.dtype == np.float64
    np.testing.assert_allclose(
        encoded.mean(axis=0), 0, atol=1e-6
    )  # mean and std are kept in float32  # standardised with these very targets
    np.testing.assert_allclose(encoded.std(axis=0), 1, rtol=1e-4)
    np.testing.assert_allclose(encoding.decode(encoded), targets, rtol=1e-4, atol=1e-4)


def test_encoding_closed_form_and_wrap_around():
    encoding = TargetEncoding(("theta",), (180.0,))
    np.testing.assert_allclose(encoding.encode(np.array([[0.0], [45.0], [90.0]])), [[1, 0], [0, 1], [-1, 0]], atol=1e-6)
    # 179 and 1 degree are neighbours on a 180-degree circle, and a prediction comes back in [0, 180).
    assert np.linalg.norm(encoding.encode([[179.0]]) - encoding.encode([[1.0]])) < 0.08
    np.testing.assert_allclose(encoding.decode(encoding.encode([[-10.0], [190.0]])), [[170.0], [10.0]], atol=1e-4)


def test_plain_targets_standardise_as_before_and_json_round_trips():
    targets = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    encoding = TargetEncoding.fit(["a", "b"], {}, targets, standardize=True)
    np.testing.assert_allclose(encoding.mean, [3, 10])
    np.testing.assert_allclose(encoding.std, [math.sqrt(8 / 3), 1])  # a constant column gets std 1
    again = TargetEncoding.from_json(encoding.to_json())
    np.testing.assert_array_equal(again.encode(targets), encoding.encode(targets))
    assert TargetEncoding.fit(["a"], {}, None, standardize=False).mean is None


def test_angle_declarations():
    assert parse_angles(COSMOSIM_ANGLES) == {"theta": 180.0, "orientation": 180.0, "phi": 360.0}
    assert parse_angles(()) == {}
    for bad in ("theta", "theta:0", "theta:x", ":90"):
        with pytest.raises(ValueError, match="name:period"):
            parse_angles([bad])


def test_target_weights_spread_over_an_angles_columns():
    assert parse_weights(["theta:4", " x : 0.5"]) == {"theta": 4.0, "x": 0.5}
    for bad in ("theta", "theta:0", "theta:-1", ":2", "theta:nan"):
        with pytest.raises(ValueError, match=rf"target weight '{re.escape(bad)}': write name:weight"):
            parse_weights([bad])
    encoding = TargetEncoding.fit(["x", "theta", "y"], {"theta": math.pi}, None, standardize=False)
    np.testing.assert_array_equal(encoding.column_weights({"theta": 4.0, "y": 0.5}), [1, 4, 4, 0.5])
    assert encoding.column_weights({}).dtype == np.float32 and encoding.column_weights({}).tolist() == [1] * 4
    with pytest.raises(ValueError, match=r"weights for \['sigma'\], which are not among the targets \['x', 'theta'"):
        encoding.column_weights({"sigma": 2.0})


@pytest.mark.parametrize("standardize", [True, False])
def test_a_weighted_target_is_encoded_at_sqrt_weight_scale_and_decodes_back(standardize):
    rng = np.random.default_rng(1)
    targets = np.stack([rng.normal(5, 2, 300), rng.uniform(0, math.pi, 300)], axis=1)
    angles = {"theta": math.pi}
    plain = TargetEncoding.fit(["x", "theta"], angles, targets, standardize=standardize)
    weighted = TargetEncoding.fit(["x", "theta"], angles, targets, standardize=standardize, weights={"theta": 4})
    # theta's columns twice as large, so their squared errors weigh 4; x's unchanged.
    np.testing.assert_allclose(weighted.encode(targets), plain.encode(targets) * [1, 2, 2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weighted.decode(weighted.encode(targets)), targets, rtol=1e-9, atol=1e-9)
    restored = TargetEncoding.from_json(weighted.to_json())  # what a checkpoint keeps
    np.testing.assert_allclose(restored.encode(targets), weighted.encode(targets), rtol=1e-6, atol=1e-6)
    unweighted = TargetEncoding.fit(["x", "theta"], angles, targets, standardize=standardize, weights={})
    np.testing.assert_array_equal(unweighted.encode(targets), plain.encode(targets))


def test_an_ellipses_angle_is_encoded_as_its_ellipticity_times_cos_and_sin():
    assert parse_axis_ratios(["theta:sigma2/sigma"]) == {"theta": ("sigma2", "sigma")}
    for bad in ("theta", "theta:sigma2", "theta:/sigma", ":a/b"):
        with pytest.raises(ValueError, match="write angle:minor/major"):
            parse_axis_ratios([bad])
    names, angles, axes = ["sigma", "sigma2", "theta"], {"theta": math.pi}, {"theta": ("sigma2", "sigma")}
    # Round (ratio 1), ratio 0.5 and ratio 0.25 ellipses at theta = pi/8, and a zero row (batch padding).
    targets = np.array([[4.0, 4.0, math.pi / 8], [4.0, 2.0, math.pi / 8], [4.0, 1.0, math.pi / 8], [0, 0, 0]])
    encoding = TargetEncoding.fit(names, angles, None, standardize=False, axis_ratios=axes)
    half = math.sqrt(0.5)  # cos and sin of 2 pi/8
    expected = [[4, 4, 0, 0], [4, 2, 0.5 * half, 0.5 * half], [4, 1, 0.75 * half, 0.75 * half], [0, 0, 0, 0]]
    np.testing.assert_allclose(encoding.encode(targets), expected, atol=1e-12)
    np.testing.assert_allclose(encoding.decode(encoding.encode(targets))[1:3], targets[1:3], atol=1e-12)
    restored = TargetEncoding.from_json(encoding.to_json())
    np.testing.assert_allclose(restored.encode(targets), expected, atol=1e-12)
    assert TargetEncoding.from_json({**encoding.to_json(), "axis_ratios": None}).axis_ratios == ()  # saved before
    rng = np.random.default_rng(2)
    sigma = rng.uniform(2, 6, 400)
    train = np.stack([sigma, sigma * rng.uniform(0.5, 1, 400), rng.uniform(0, math.pi, 400)], axis=1)
    standardised = TargetEncoding.fit(names, angles, train, standardize=True, axis_ratios=axes, weights={"theta": 4})
    np.testing.assert_allclose(standardised.decode(standardised.encode(train))[:, 2], train[:, 2], atol=1e-9)
    with pytest.raises(ValueError, match=r"angle axes theta:sigma3/sigma: theta must be an angle and sigma3, sigma"):
        TargetEncoding.fit(names, angles, None, standardize=False, axis_ratios={"theta": ("sigma3", "sigma")})
    with pytest.raises(ValueError, match=r"angle axes sigma:sigma2/sigma: sigma must be an angle"):
        TargetEncoding.fit(names, angles, None, standardize=False, axis_ratios={"sigma": ("sigma2", "sigma")})


AMPLITUDES = ["sigma", "alpha[1][0]", "alpha[0][1]", "beta[0][1]", "alpha[2][3]", "luminosity", "beta[2][3]"]


def test_roulette_amplitudes_pair_up_and_a_lone_one_stands_alone():
    assert roulette_pairs(AMPLITUDES) == (
        ("alpha[1][0]", None),
        ("alpha[0][1]", "beta[0][1]"),
        ("alpha[2][3]", "beta[2][3]"),
    )
    assert roulette_pairs(["beta[4][1]", "x", "alpha[10][11]"]) == (("beta[4][1]", None), ("alpha[10][11]", None))
    assert roulette_pairs(["x", "theta"]) == ()


def test_polar_amplitudes_closed_form_round_trip_and_json():
    # (alpha, beta) = (3, 4): log 5 and (0.6, 0.8); alpha[1][0] = -2: log 2 and sign -1; a zero row pads a batch.
    targets = np.array([[1.5, -2.0, 3.0, 4.0, 0.0, 7.0, -1e-6], [0, 0, 0, 0, 0, 0, 0]])
    encoding = TargetEncoding.fit(AMPLITUDES, {}, None, standardize=False, polar=roulette_pairs(AMPLITUDES))
    assert encoding.encoded_names == (
        "sigma",
        "alpha[1][0] log magnitude",
        "alpha[1][0] sign",
        "alpha[0][1], beta[0][1] log magnitude",
        "alpha[0][1], beta[0][1] cos",
        "alpha[0][1], beta[0][1] sin",
        "alpha[2][3], beta[2][3] log magnitude",
        "alpha[2][3], beta[2][3] cos",
        "alpha[2][3], beta[2][3] sin",
        "luminosity",
    )
    encoded = encoding.encode(targets)
    np.testing.assert_allclose(encoded[0], [1.5, math.log(2), -1, math.log(5), 0.6, 0.8, math.log(1e-6), 0, -1, 7])
    assert np.all(np.isfinite(encoded[1])) and encoded[1, 4] == 0  # the zero row: no direction, a tiny magnitude
    np.testing.assert_allclose(encoding.decode(encoded), targets, rtol=1e-12, atol=1e-12)
    # A direction predicted shorter than 1 (an unsure network) shrinks the amplitudes with it.
    np.testing.assert_allclose(encoding.decode(encoded * [1, 1, 0.5, 1, 0.5, 0.5, 1, 1, 1, 1])[0, 1:4], [-1, 1.5, 2])
    rng = np.random.default_rng(3)
    train = rng.normal(size=(500, 7)) * np.exp(rng.normal(0, 3, size=(500, 1)))  # magnitudes over decades
    standardised = TargetEncoding.fit(
        AMPLITUDES, {}, train, standardize=True, polar=roulette_pairs(AMPLITUDES), weights={"beta[0][1]": 4}
    )
    np.testing.assert_allclose(standardised.encode(train).std(axis=0)[[0, 1, 6]], [1, 1, 1], rtol=1e-4)
    np.testing.assert_allclose(standardised.decode(standardised.encode(train)), train, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(standardised.column_weights({"beta[0][1]": 4}), [1, 1, 1, 4, 4, 4, 1, 1, 1, 1])
    restored = TargetEncoding.from_json(standardised.to_json())  # what a checkpoint keeps
    assert restored.polar == standardised.polar
    np.testing.assert_allclose(restored.decode(standardised.encode(train)), train, rtol=1e-6, atol=1e-9)
    assert TargetEncoding.from_json({**encoding.to_json(), "polar": None}).polar == ()  # saved before


def test_polar_amplitudes_move_with_the_image_keeping_magnitude_and_sureness():
    rng = np.random.default_rng(4)
    targets = rng.normal(size=(20, len(AMPLITUDES)))
    encoding = TargetEncoding.fit(AMPLITUDES, {}, targets, standardize=True, polar=roulette_pairs(AMPLITUDES))
    symmetry = TargetSymmetry.for_targets(AMPLITUDES)
    unsure = encoding.encode(targets) * encoding.std + encoding.mean
    unsure[:, [2, 4, 5]] *= 0.5  # the lone sign and the first pair's direction at half length
    unsure = (unsure - encoding.mean) / encoding.std
    for matrix in SYMMETRIES:
        moved = encoding.move(encoding.encode(targets), lambda t, m=matrix: symmetry.apply(t, m))
        np.testing.assert_allclose(encoding.decode(moved), symmetry.apply(targets, matrix), atol=1e-9)
        raw = encoding.move(unsure, lambda t, m=matrix: symmetry.apply(t, m)) * encoding.std + encoding.mean
        np.testing.assert_allclose(np.abs(raw[:, 2]), 0.5, rtol=1e-9)
        np.testing.assert_allclose(np.hypot(raw[:, 4], raw[:, 5]), 0.5, rtol=1e-9)
        np.testing.assert_allclose(raw[:, [1, 3, 6]], (unsure * encoding.std + encoding.mean)[:, [1, 3, 6]], atol=1e-9)


def test_polar_amplitudes_refuse_what_they_cannot_encode():
    with pytest.raises(
        ValueError, match=r"polar amplitudes \[\('a', 'c'\)\]: each must be a target among \['a', 'b'\]"
    ):
        TargetEncoding.fit(["a", "b"], {}, None, standardize=False, polar=[("a", "c")])
    with pytest.raises(ValueError, match="not an angle"):
        TargetEncoding.fit(["a", "b"], {"b": 180.0}, None, standardize=False, polar=[("a", "b")])
    with pytest.raises(ValueError, match="in one pair only"):
        TargetEncoding.fit(["a", "b"], {}, None, standardize=False, polar=[("a", "b"), ("b", None)])
    encoding = TargetEncoding.fit(["a", "b"], {}, None, standardize=False, polar=[("a", "b")])
    with pytest.raises(ValueError, match=r"\['a', 'b'\] are trained together: give them one weight"):
        encoding.column_weights({"a": 2, "b": 3})


def test_circular_report_closed_forms():
    true = np.array([[179.0], [1.0], [90.0], [45.0]])
    predicted = np.array([[1.0], [179.0], [91.0], [44.0]])
    report = metrics.regression_report(true, predicted, ["theta"], periods=(180.0,))["parameters"]["theta"]
    # errors the short way round: +2, -2, +1, -1 degrees
    assert report["mae"] == pytest.approx(1.5) and report["bias"] == pytest.approx(0.0)
    assert report["rmse"] == pytest.approx(math.sqrt(2.5)) and report["period"] == 180.0
    assert metrics.circular_mean(np.array([179.0, 1.0]), 180.0) in (pytest.approx(0.0), pytest.approx(180.0))
    linear = metrics.regression_report(true, predicted, ["theta"])["parameters"]["theta"]
    assert linear["mae"] == pytest.approx((178 + 178 + 1 + 1) / 4)  # what a plain number would report
    assert report["r2"] > linear["r2"]
