"""The examples/ scripts, each run in a reduced form, with the outcome it claims asserted.

Examples are scripts, not a package, so each is loaded from its file; figures go to a temporary folder.
"""

import importlib.util
import itertools
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert os.path.getsize(path) > 10_000, f"{path} is too small to hold the plots"


def test_single_neuron_separates_the_data_and_the_threshold_neuron_gets_no_gradient(tmp_path):
    result = load_example("single_neuron").main(num_points=60, steps=30, output_dir=str(tmp_path))
    assert result["initial_accuracy"] < 0.8  # the first guess is wrong, so learning shows
    assert result["accuracy"] == 1.0
    assert result["final_loss"] < 0.2 * result["initial_loss"]
    assert result["threshold_max_gradient"] == 0.0  # exactly: the step function has no slope
    assert result["threshold_accuracy"] == result["initial_accuracy"]  # so it never moved
    gaps = list(result["beta_gaps"].values())
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps) if earlier > 0)
    assert gaps[-1] < 1e-6  # beta 64: the logistic neuron gives the threshold's outputs on every point
    assert_png(result["figure"])


def test_activations_derivatives(tmp_path):
    result = load_example("activations").main(num_points=201, output_dir=str(tmp_path))
    assert result["threshold_max_abs_derivative"] == 0.0
    assert result["relu_derivative"] == {-1.0: 0.0, 0.0: 0.0, 1.0: 1.0}
    for beta, slope in result["logistic_derivative_at_0"].items():
        assert slope == pytest.approx(beta / 4, rel=1e-6)
    gaps = list(result["logistic_threshold_gap"].values())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01  # large beta approaches the threshold
    assert_png(result["figure"])


@pytest.mark.slow
def test_regression_vs_classification_both_learn(tmp_path):
    result = load_example("regression_vs_classification").main(
        num_train=512,
        num_validation=128,
        num_test=256,
        epochs=3,
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path),
    )
    regression, classification = result["regression"], result["classification"]
    assert regression["train_loss"][-1] < 0.7 * regression["train_loss"][0]  # the MLP's regression loss falls
    assert regression["validation_loss"][-1] < regression["validation_loss"][0]
    assert regression["r2"] > 0.3
    assert classification["train_loss"][-1] < classification["train_loss"][0]
    assert classification["accuracy"] > 0.65  # chance is 50 %
    assert classification["count"] == 256  # the padded last batch loses no test example
    assert_png(result["figure"])
