"""Target encoding: angles as (cos, sin), standardisation, and back; circular errors in the reports."""

import math

import numpy as np
import pytest

from jaxnets import metrics
from jaxnets.data.targets import COSMOSIM_ANGLES, TargetEncoding, parse_angles


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
