"""The lecture's single neuron, y = f(w . x + b), trained by gradient descent to separate two point clouds.

Shows that the logistic neuron learns (100 % accuracy on separable data), that the threshold neuron gets a
gradient of exactly zero and never moves, and that a large beta turns the logistic into the threshold.
Run `python examples/single_neuron.py`: a few seconds on a laptop CPU; writes examples/output/single_neuron.png.
"""

import argparse
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import activations, losses, neuron

# A deliberately wrong first guess: the line y = x + 1 cuts both clouds in half.
INITIAL_WEIGHTS = (1.0, -1.0)
INITIAL_BIAS = 1.0
BETAS = (1.0, 4.0, 16.0, 64.0)
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")

Params = dict[str, jax.Array]


def point_clouds(num_points: int, seed: int = 0, margin: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clouds around (-1, -1) (label 0) and (1, 1) (label 1), linearly separable by construction.

    Points on the wrong side of the line x + y = 0, or closer to it than `margin`, are dropped, so a neuron
    can classify every point correctly. Returns points float32 [N, 2] and labels float32 [N] (0 or 1).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 4 * num_points)
    points = np.where(labels[:, None] == 1, 1.0, -1.0) + 0.7 * rng.normal(size=(4 * num_points, 2))
    distance = points.sum(axis=1) / np.sqrt(2)  # signed distance from x + y = 0
    keep = (np.sign(distance) == 2 * labels - 1) & (np.abs(distance) > margin)
    return points[keep][:num_points].astype(np.float32), labels[keep][:num_points].astype(np.float32)


def squared_error(params: Params, points: jax.Array, labels: jax.Array, activation: Callable) -> jax.Array:
    """The lecture's loss for one neuron: mean over the points of (f(w . x + b) - label)^2."""
    return losses.mse(neuron.neuron(points, params["w"], params["b"], activation), labels)


def accuracy(params: Params, points: jax.Array, labels: jax.Array) -> float:
    """Fraction of points on the right side of the decision line w . x + b = 0."""
    predicted = activations.threshold(neuron.weighted_input(points, params["w"], params["b"]))
    return float(jnp.mean(predicted == labels))


def gradient_descent(
    points: np.ndarray, labels: np.ndarray, activation: Callable, steps: int, learning_rate: float
) -> tuple[list[Params], list[float], list[float]]:
    """Full-batch gradient descent with jax.value_and_grad and optax.sgd, from the fixed first guess.

    Returns the parameters after every step (steps + 1 entries, the first guess first), the loss before
    every step and the largest absolute gradient component of every step.
    """
    points, labels = jnp.asarray(points), jnp.asarray(labels)
    params = {"w": jnp.array(INITIAL_WEIGHTS), "b": jnp.array(INITIAL_BIAS)}
    optimizer = optax.sgd(learning_rate)
    optimizer_state = optimizer.init(params)

    @jax.jit
    def step(params, optimizer_state):
        loss, grads = jax.value_and_grad(squared_error)(params, points, labels, activation)
        updates, optimizer_state = optimizer.update(grads, optimizer_state)
        largest_gradient = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
        return optax.apply_updates(params, updates), optimizer_state, loss, largest_gradient

    history, loss_history, gradient_history = [params], [], []
    for _ in range(steps):
        params, optimizer_state, loss, largest_gradient = step(params, optimizer_state)
        history.append(params)
        loss_history.append(float(loss))
        gradient_history.append(float(largest_gradient))
    return history, loss_history, gradient_history


def plot(points, labels, logistic_history, logistic_losses, threshold_losses, beta_gaps, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_points, ax_loss, ax_beta) = plt.subplots(1, 3, figsize=(16, 5))

    # 1. The points and the decision line w . x + b = 0 as gradient descent moves it.
    ax_points.scatter(*points[labels == 0].T, s=12, c="tab:blue", label="label 0")
    ax_points.scatter(*points[labels == 1].T, s=12, c="tab:orange", label="label 1")
    low, high = points.min() - 0.5, points.max() + 0.5
    xs = np.linspace(low, high, 2)
    shown = sorted({0, 1, 2, 5, 10, 20, 40, len(logistic_history) - 1} & set(range(len(logistic_history))))
    colours = plt.cm.Greys(np.linspace(0.3, 1.0, len(shown)))
    for colour, step in zip(colours, shown, strict=True):
        w, b = np.asarray(logistic_history[step]["w"]), float(logistic_history[step]["b"])
        # w0 x + w1 y + b = 0  ->  y = -(w0 x + b) / w1
        ax_points.plot(
            xs,
            -(w[0] * xs + b) / w[1],
            color=colour,
            lw=1.5 if step == shown[-1] else 1,
            label=f"step {step}" if step in (shown[0], shown[-1]) else None,
        )
    ax_points.set(
        xlim=(low, high),
        ylim=(low, high),
        aspect="equal",
        xlabel="x1",
        ylabel="x2",
        title="decision line w . x + b = 0, light (start) to dark (end)",
    )
    ax_points.legend(loc="upper left", fontsize=8)

    # 2. The loss: the logistic neuron learns; the threshold neuron's gradient is 0, so its loss never moves.
    ax_loss.plot(logistic_losses, label="logistic neuron")
    ax_loss.plot(threshold_losses, label="threshold neuron (gradient = 0)", ls="--")
    ax_loss.set(xlabel="gradient-descent step", ylabel="mean squared error", title="loss during training")
    ax_loss.legend()

    # 3. The trained neuron across its decision line: a larger beta is a steeper step.
    w, b = np.asarray(logistic_history[-1]["w"]), float(logistic_history[-1]["b"])
    norm = np.linalg.norm(w)
    distance = np.linspace(-3, 3, 601)  # signed distance from the line, along w
    for beta in BETAS:
        ax_beta.plot(distance, activations.logistic(distance * norm, beta), label=f"logistic, beta = {beta:g}")
    ax_beta.plot(distance, activations.threshold(distance), "k--", label="threshold")
    point_distance = (points @ w + b) / norm
    ax_beta.scatter(point_distance, labels, s=8, c="tab:red", alpha=0.4, zorder=3, label="training points")
    ax_beta.set(
        xlabel="signed distance from the decision line",
        ylabel="neuron output f(w . x + b)",
        title="the trained neuron: logistic(beta) approaches threshold",
    )
    ax_beta.legend(fontsize=8, loc="center right")
    gaps = ", ".join(f"beta {beta:g}: {gap:.1e}" for beta, gap in beta_gaps.items())
    ax_beta.text(
        0.02,
        0.98,
        "max |logistic - threshold| on the points\n" + gaps.replace(", b", "\nb"),
        transform=ax_beta.transAxes,
        va="top",
        fontsize=8,
    )

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(
    num_points: int = 200,
    steps: int = 100,
    learning_rate: float = 2.0,
    seed: int = 0,
    output_dir: str = DEFAULT_OUTPUT_DIR,
) -> dict:
    """Trains a logistic and a threshold neuron on the same points; prints and returns the outcomes.

    Returns {"accuracy", "initial_accuracy", "threshold_accuracy", "threshold_max_gradient",
    "initial_loss", "final_loss", "beta_gaps" ({beta: max |logistic - threshold| over the points}), "figure"}.
    """
    points, labels = point_clouds(num_points, seed)
    logistic_history, logistic_losses, _ = gradient_descent(points, labels, activations.logistic, steps, learning_rate)
    threshold_history, threshold_losses, threshold_gradients = gradient_descent(
        points, labels, activations.threshold, steps, learning_rate
    )

    trained = logistic_history[-1]
    z = neuron.weighted_input(points, trained["w"], trained["b"])
    beta_gaps = {
        beta: float(jnp.max(jnp.abs(activations.logistic(z, beta) - activations.threshold(z)))) for beta in BETAS
    }
    result = {
        "accuracy": accuracy(trained, points, labels),
        "initial_accuracy": accuracy(logistic_history[0], points, labels),
        "threshold_accuracy": accuracy(threshold_history[-1], points, labels),
        "threshold_max_gradient": max(threshold_gradients),
        "initial_loss": logistic_losses[0],
        "final_loss": logistic_losses[-1],
        "beta_gaps": beta_gaps,
    }

    os.makedirs(output_dir, exist_ok=True)
    result["figure"] = os.path.join(output_dir, "single_neuron.png")
    plot(points, labels, logistic_history, logistic_losses, threshold_losses, beta_gaps, result["figure"])

    w, b = np.asarray(trained["w"]), float(trained["b"])
    print(f"{len(points)} separable points, {steps} steps of gradient descent (optax.sgd, lr {learning_rate:g})")
    print(
        f"logistic neuron:  accuracy {result['initial_accuracy']:.1%} -> {result['accuracy']:.1%}, "
        f"loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, w = {np.round(w, 3)}, b = {b:.3f}"
    )
    print(
        f"threshold neuron: largest gradient component over all steps = {result['threshold_max_gradient']}, "
        f"so it never moves: accuracy stays {result['threshold_accuracy']:.1%}"
    )
    print(
        "logistic(beta) vs threshold on the trained neuron's points, max difference: "
        + ", ".join(f"beta {beta:g}: {gap:.2e}" for beta, gap in beta_gaps.items())
    )
    print(f"saved {result['figure']}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for single_neuron.png")
    main(output_dir=parser.parse_args().output_dir)
