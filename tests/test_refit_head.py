"""bench/refit_head.py: the last layer refitted by least squares on a trained run's features."""

import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_experiment import write_roulette_csv

from conftest import TINY, cli_args, run_in_process
from jaxnets.models import MLP, Inception3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("refit_head", os.path.join(ROOT, "bench", "refit_head.py"))
refit_head = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refit_head)


def test_without_a_ridge_a_linear_map_is_recovered_exactly():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6)) * [1, 10, 100, 0.1, 1, 1]  # scales far apart
    kernel, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
    fitted_kernel, fitted_bias = refit_head.ridge_fits(features, features @ kernel + bias, [0.0])[0]
    np.testing.assert_allclose(fitted_kernel, kernel, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fitted_bias, bias, rtol=1e-8, atol=1e-10)


def test_a_large_ridge_leaves_the_targets_mean():
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(100, 4)), rng.normal(size=(100, 2)) + [5.0, -3.0]
    kernel, bias = refit_head.ridge_fits(features, targets, [1e9])[0]
    assert np.abs(kernel).max() < 1e-8
    np.testing.assert_allclose(bias, targets.mean(axis=0), atol=1e-6)
    # The ridge is relative to the features' own scale: scaling them scales the kernel back, the fit is the same.
    small, scaled = (
        refit_head.ridge_fits(features, targets, [0.1])[0],
        refit_head.ridge_fits(1000 * features, targets, [0.1])[0],
    )
    np.testing.assert_allclose(scaled[0] * 1000, small[0], rtol=1e-8)


def test_the_last_layer_taken_out_of_an_mlp_gives_back_its_outputs():
    model = MLP(12, [8, 5], 3, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(2).normal(size=(4, 12)), jnp.float32)
    outputs = model(images)
    last = refit_head.without_last_layer(model)
    features = model(images)
    assert features.shape == (4, 5)
    np.testing.assert_allclose(features @ last.kernel[...] + last.bias[...], outputs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_features, width", [((1024, 512), 512), ((), 2048)])
def test_the_last_layer_of_inception3_is_its_heads_last(head_features, width):
    model = Inception3(3, in_channels=1, head_features=head_features, rngs=nnx.Rngs(0))
    last = refit_head.without_last_layer(model)
    assert isinstance(last, nnx.Linear) and last.kernel.shape == (width, 3)


@pytest.mark.slow
def test_a_trained_run_is_refitted_and_reported(tmp_path, capsys, monkeypatch):
    csv_file = write_roulette_csv(tmp_path / "csv", num_rows=60)
    workdir = tmp_path / "run"
    tiny = dict(TINY, num_train=None, num_validation=None, num_test=None, image_size=None, epochs=1)
    args = cli_args(**{k: v for k, v in tiny.items() if v is not None}, workdir=workdir, data_dir=tmp_path / "tfds")
    targets = "sigma,xiX,xiY,alpha[*][*],beta[*][*]"
    trained = run_in_process(capsys, "train.py", "--data", csv_file, "--targets", targets, *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    out = tmp_path / "refit.json"
    monkeypatch.setattr(sys, "argv", ["refit_head.py", str(workdir), "--out", str(out)])
    refit_head.main()
    report = json.loads(out.read_text())
    as_trained = report["results"]["as trained"]["test"]["r2"]
    # Scored as evaluate.py scores the run (8 views averaged), before any refit.
    saved = json.loads((workdir / "eval_test.json").read_text())["parameters"]
    assert as_trained == pytest.approx({name: p["r2"] for name, p in saved.items()}, abs=1e-4)
    assert report["chosen"] in [f"ridge {ridge:g}" for ridge in refit_head.RIDGES]
    assert "(chosen on validation)" in capsys.readouterr().out
