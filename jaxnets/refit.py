"""The network's last layer refitted by least squares: the kernel and bias of its last Linear solved in closed form
(ridge regression) from the features that layer reads to the encoded targets, every other weight kept as trained.

R² scores squared errors, and the Huber loss CosmoSim's roulette amplitudes train with bounds the pull of the rare
large rows that decide it; solving the last layer for the squared error on the trained network's own features gives
that back, and lifted every R² mean of the group's three problems (docs/cosmosim_runs.md, "The last layer refitted by
least squares"). A refit is only kept when it scores better on the validation split than the layer as trained.
"""

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxnets import training
from jaxnets.data.symmetry import SYMMETRIES, transform_images
from jaxnets.models import MLP

# Ridges tried, relative to the mean variance of the features (so one scale fits every network); 0 is plain least
# squares. The validation split chooses among them.
RIDGES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def last_layer(model: nnx.Module) -> nnx.Linear:
    """The last Linear of an MLP or an Inception3 (its fc, or the last layer of its head)."""
    if isinstance(model, MLP):
        return model.layers[-1]
    return model.fc if isinstance(model.fc, nnx.Linear) else model.fc.layers[-1]


class _Features(nnx.Module):
    """Stands where the last Linear was: the model then returns what that layer reads."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def without_last_layer(model: nnx.Module) -> nnx.Linear:
    """Takes the last Linear out of model, in place, and returns it: the model then returns that layer's input."""
    last = last_layer(model)
    if isinstance(model, MLP):
        model.layers[-1] = _Features()
    elif model.fc is last:
        model.fc = _Features()
    else:
        model.fc.layers[-1] = _Features()
    return last


def with_last_layer(state: training.TrainState, kernel: np.ndarray, bias: np.ndarray) -> training.TrainState:
    """state with the kernel [F, W] and bias [W] of its model's last Linear replaced; ValueError if they do not fit."""
    model = state.model()
    layer = last_layer(model)
    if np.shape(kernel) != layer.kernel.shape or np.shape(bias) != layer.bias.shape:
        raise ValueError(
            f"a last layer of kernel {np.shape(kernel)} and bias {np.shape(bias)} does not fit the model's "
            f"{layer.kernel.shape} and {layer.bias.shape}"
        )
    layer.kernel[...] = jnp.asarray(kernel, layer.kernel.dtype)
    layer.bias[...] = jnp.asarray(bias, layer.bias.dtype)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return state.replace(params=params)


def make_feature_step() -> Callable[[training.TrainState, training.Batch], jax.Array]:
    """A jit-compiled `feature_step(state, batch) -> features [batch, F]` (float32): what the last layer reads, in eval
    mode."""

    def feature_step(state: training.TrainState, batch: training.Batch) -> jax.Array:
        model = state.model(train=False)
        without_last_layer(model)
        return model(batch["image"]).astype(jnp.float32)

    return jax.jit(feature_step)


class NormalEquations(NamedTuple):
    """The sums least squares from features [N, F] to targets [N, W] needs, in float64: a pytree, so the sums of two
    sets of rows are `jax.tree.map(operator.add, a, b)`."""

    count: np.ndarray  # []
    feature_sum: np.ndarray  # [F]
    target_sum: np.ndarray  # [W]
    gram: np.ndarray  # [F, F]: features^T features
    moment: np.ndarray  # [F, W]: features^T targets

    @classmethod
    def of(cls, features: np.ndarray, targets: np.ndarray) -> "NormalEquations":
        x, y = np.asarray(features, np.float64), np.asarray(targets, np.float64)
        return cls(np.float64(len(x)), x.sum(axis=0), y.sum(axis=0), x.T @ x, x.T @ y)

    def solve(self, ridges: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        """targets ≈ features @ kernel + bias with a ridge on the kernel: one (kernel [F, W], bias [W]) per ridge,
        each relative to the mean eigenvalue of the centred features' Gram matrix (the fit does not depend on the
        features' scale)."""
        if self.count < 1:
            raise ValueError("least squares needs at least one example")
        x_mean, y_mean = self.feature_sum / self.count, self.target_sum / self.count
        gram = self.gram - self.count * np.outer(x_mean, x_mean)  # centred: the bias takes the means
        moment = self.moment - self.count * np.outer(x_mean, y_mean)
        scale = max(np.trace(gram) / len(gram), np.finfo(np.float64).tiny)
        fits = []
        for ridge in ridges:
            kernel = np.linalg.lstsq(gram + ridge * scale * np.eye(len(gram)), moment, rcond=None)[0]
            fits.append((kernel, y_mean - x_mean @ kernel))
        return fits


@dataclasses.dataclass(frozen=True)
class Refit:
    """What `refit_last_layer` found: the kernel [F, W] and bias [W] chosen (ridge None: the layer as trained), and
    the validation score as trained and with them."""

    kernel: np.ndarray
    bias: np.ndarray
    ridge: float | None
    trained_score: float
    score: float
    examples: int  # training rows the least squares saw


def refit_last_layer(
    state: training.TrainState,
    train_batches: Iterable[training.Batch],
    validation_batches: Iterable[training.Batch],
    score: Callable[[list[np.ndarray], np.ndarray], float],
    mesh: Mesh,
    *,
    views: Sequence[np.ndarray] = SYMMETRIES[:1],
    ridges: Sequence[float] = RIDGES,
) -> Refit:
    """Solves the last layer of state's model (its parameters as evaluated: pass `with_ema_params(state)`) by least
    squares on the training batches' features and encoded targets ("target"), for each ridge, and keeps what scores
    highest on the validation batches, the layer as trained included.

    score(outputs, true) -> the figure to maximise: outputs is one [N, W] array of encoded outputs per view (the
    validation images moved by each of views, as evaluate.py's test-time augmentation reads them), true the
    batches' "raw_target" [N, P] where they carry it (a TargetEncoding's batches), else their "target". Multi-process
    runs: every process passes its own rows and gets the same answer.
    """
    feature_step = make_feature_step()

    def features(batch: training.Batch) -> np.ndarray:
        return training.process_local(feature_step(state, training.shard_batch(batch, mesh)))

    sums = None
    for batch in train_batches:
        real = np.asarray(batch["mask"]) > 0
        rows = NormalEquations.of(features(batch)[real], np.asarray(batch["target"])[real])
        sums = rows if sums is None else jax.tree.map(operator.add, sums, rows)
    if sums is None:
        raise ValueError("the training split is empty: nothing to refit the last layer on")
    sums = jax.tree.map(_summed_over_processes, sums)

    per_view, true, masks = [[] for _ in views], [], []
    for batch in validation_batches:
        masks.append(np.asarray(batch["mask"]) > 0)
        true.append(np.asarray(batch.get("raw_target", batch["target"])))
        for rows, view in zip(per_view, views, strict=True):
            rows.append(features(dict(batch, image=transform_images(batch["image"], view))))
    if not masks:
        raise ValueError("the validation split is empty: nothing to choose the refit's ridge on")
    real = _gathered(np.concatenate(masks))
    true = _gathered(np.concatenate(true))[real]
    per_view = [_gathered(np.concatenate(rows))[real] for rows in per_view]

    trained = last_layer(state.model())
    kernel, bias = np.asarray(trained.kernel[...], np.float64), np.asarray(trained.bias[...], np.float64)
    trained_score = score([view @ kernel + bias for view in per_view], true)
    best = Refit(kernel, bias, None, trained_score, trained_score, int(sums.count))
    for ridge, (kernel, bias) in zip(ridges, sums.solve(ridges), strict=True):
        fitted = score([view @ kernel + bias for view in per_view], true)
        if fitted > best.score:
            best = dataclasses.replace(best, kernel=kernel, bias=bias, ridge=float(ridge), score=fitted)
    return best


def _summed_over_processes(value: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return value
    value = np.asarray(value, np.float64)
    # Sent as raw 32-bit words: JAX without x64 would round float64 to float32 on the way.
    words = np.asarray(multihost_utils.process_allgather(value.reshape(-1).view(np.uint32)))
    return words.view(np.float64).reshape(-1, *value.shape).sum(axis=0)


def _gathered(rows: np.ndarray) -> np.ndarray:
    """Every process's rows, process by process (each process reads as many padded evaluation rows)."""
    if jax.process_count() == 1:
        return rows
    return np.asarray(multihost_utils.process_allgather(rows, tiled=True))
