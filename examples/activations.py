"""The lecture's activation functions and the derivatives JAX computes for them.

Plots threshold, logistic for several beta and ReLU (top row) and their jax.grad derivatives (bottom row).
Run `python examples/activations.py`: a few seconds on a laptop CPU; writes examples/output/activations.png.
"""

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import activations

BETAS = (0.5, 1.0, 2.0, 5.0, 20.0)
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


def derivative(function):
    """x [N] -> f'(x) [N]: jax.grad of the scalar function, vectorised with jax.vmap."""
    return jax.jit(jax.vmap(jax.grad(function)))


def plot(x, curves, slopes, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    names = ("threshold", "logistic", "relu")
    titles = ("threshold: f = 1 if x >= 0 else 0", "logistic: f = 1 / (1 + exp(-beta x))", "ReLU: f = max(0, x)")
    for column, (name, title) in enumerate(zip(names, titles, strict=True)):
        for label, values in curves[name].items():
            axes[0, column].plot(x, values, label=label)
        for label, values in slopes[name].items():
            axes[1, column].plot(x, values, label=label)
        axes[0, column].set(title=title, ylabel="f(x)")
        axes[1, column].set(title=f"jax.grad({name})", xlabel="x", ylabel="f'(x)")
    axes[0, 1].plot(x, curves["threshold"]["threshold"], "k--", lw=1, label="threshold")
    axes[0, 1].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    axes[1, 0].set_ylim(-0.1, 1.1)
    axes[1, 0].text(
        0.03,
        0.6,
        "JAX: exactly 0 everywhere, also at x = 0\n(mathematically a spike at 0):\n"
        "no gradient, so gradient descent\ncannot train a threshold unit",
        transform=axes[1, 0].transAxes,
        fontsize=9,
    )
    axes[1, 1].text(
        0.03, 0.8, "f'(x) = beta f(x) (1 - f(x)),\npeak beta / 4 at x = 0", transform=axes[1, 1].transAxes, fontsize=9
    )
    axes[1, 2].set_ylim(-0.1, 1.1)
    axes[1, 2].text(
        0.55,
        0.4,
        "0 for x < 0, 1 for x > 0;\nJAX (like PyTorch)\nuses 0 at x = 0",
        transform=axes[1, 2].transAxes,
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(num_points: int = 801, output_dir: str = DEFAULT_OUTPUT_DIR) -> dict:
    """Evaluates every activation and its jax.grad on [-5, 5]; prints, plots and returns the key numbers.

    Returns {"threshold_max_abs_derivative", "relu_derivative_at_0", "relu_derivative" ({-1, 1}: value),
    "logistic_derivative_at_0" ({beta: value}, beta / 4 in theory), "logistic_threshold_gap"
    ({beta: max |logistic - threshold| for |x| >= 0.25}), "figure"}.
    """
    x = jnp.linspace(-5.0, 5.0, num_points)  # odd num_points puts a sample exactly at 0
    logistic = {beta: functools.partial(activations.logistic, beta=beta) for beta in BETAS}

    curves = {
        "threshold": {"threshold": activations.threshold(x)},
        "logistic": {f"beta = {beta:g}": f(x) for beta, f in logistic.items()},
        "relu": {"relu": activations.relu(x)},
    }
    slopes = {
        "threshold": {"threshold": derivative(activations.threshold)(x)},
        "logistic": {f"beta = {beta:g}": derivative(f)(x) for beta, f in logistic.items()},
        "relu": {"relu": derivative(activations.relu)(x)},
    }
    away_from_zero = jnp.abs(x) >= 0.25
    at = jnp.array([-1.0, 0.0, 1.0])
    result = {
        "threshold_max_abs_derivative": float(jnp.max(jnp.abs(slopes["threshold"]["threshold"]))),
        "relu_derivative_at_0": float(jax.grad(activations.relu)(0.0)),
        "relu_derivative": {float(v): float(d) for v, d in zip(at, derivative(activations.relu)(at), strict=True)},
        "logistic_derivative_at_0": {beta: float(jax.grad(f)(0.0)) for beta, f in logistic.items()},
        "logistic_threshold_gap": {
            beta: float(jnp.max(jnp.where(away_from_zero, jnp.abs(f(x) - activations.threshold(x)), 0.0)))
            for beta, f in logistic.items()
        },
    }

    os.makedirs(output_dir, exist_ok=True)
    result["figure"] = os.path.join(output_dir, "activations.png")
    plot(np.asarray(x), curves, slopes, result["figure"])

    print(f"threshold: largest |f'(x)| on [-5, 5] = {result['threshold_max_abs_derivative']} (zero gradient)")
    print("ReLU: f'(-1), f'(0), f'(1) = " + ", ".join(f"{d:g}" for d in result["relu_derivative"].values()))
    print(
        "logistic: f'(0) = beta / 4: "
        + ", ".join(f"beta {beta:g}: {d:.4f}" for beta, d in result["logistic_derivative_at_0"].items())
    )
    print(
        "logistic approaches threshold as beta grows, max |logistic - threshold| for |x| >= 0.25: "
        + ", ".join(f"beta {beta:g}: {gap:.3g}" for beta, gap in result["logistic_threshold_gap"].items())
    )
    print(f"saved {result['figure']}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for activations.png")
    main(output_dir=parser.parse_args().output_dir)
