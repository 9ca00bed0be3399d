"""The network's head refitted on the features it reads, every other weight kept as trained: its last Linear solved
in closed form (ridge regression) to the encoded targets, and a head with hidden layers (the CosmoML head) also
fine-tuned whole with Adam on the squared error.

R² scores squared errors, and the Huber loss CosmoSim's roulette amplitudes train with bounds the pull of the rare
large rows that decide it; refitting the head for the squared error on the trained network's own features gives that
back, and lifted every R² mean of the group's three problems (docs/cosmosim_runs.md, "The last layer refitted by least
squares", "The whole head refitted"). A refit is only kept when it scores better on the validation split than the head
as trained.
"""

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxnets import training
from jaxnets.data.symmetry import SYMMETRIES, transform_images
from jaxnets.models import MLP

# Ridges tried, relative to the mean variance of the features (so one scale fits every network); 0 is plain least
# squares. The validation split chooses among them.
RIDGES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# A head with hidden layers (the CosmoML head) is also fine-tuned whole on the squared error, from its trained weights:
# Adam at this rate, this batch, and the epoch (of at most HEAD_EPOCHS) the validation split scores highest
# (docs/cosmosim_runs.md, "The whole head refitted": chosen so, it gained on the test split of all three problems).
HEAD_LR, HEAD_BATCH, HEAD_EPOCHS = 3e-4, 128, 30


def head(model: nnx.Module) -> nnx.Module:
    """What reads the network's features: Inception3's fc (a Linear, or the CosmoML head of Linears and ReLUs), an
    MLP's last Linear."""
    return model.layers[-1] if isinstance(model, MLP) else model.fc


def head_layers(model: nnx.Module) -> list[nnx.Linear]:
    """The Linear layers of the model's head, in order."""
    return _linears(head(model))


def _linears(module: nnx.Module) -> list[nnx.Linear]:
    return [layer for layer in module.layers if isinstance(layer, nnx.Linear)] if _has_hidden(module) else [module]


def last_layer(model: nnx.Module) -> nnx.Linear:
    """The last Linear of an MLP or an Inception3 (its fc, or the last layer of its head)."""
    return head_layers(model)[-1]


def _has_hidden(module: nnx.Module) -> bool:
    return isinstance(module, nnx.Sequential)


def _hidden(module: nnx.Module, x: jax.Array) -> jax.Array:
    """What the head's last Linear reads, from what the head reads."""
    if _has_hidden(module):
        for layer in module.layers[:-1]:
            x = layer(x)
    return x


class _Features(nnx.Module):
    """Stands where the head was: the model then returns what the head reads."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def without_head(model: nnx.Module) -> nnx.Module:
    """Takes the head out of model, in place, and returns it: the model then returns the head's input."""
    module = head(model)
    if isinstance(model, MLP):
        model.layers[-1] = _Features()
    else:
        model.fc = _Features()
    return module


def with_head_layers(
    state: training.TrainState, layers: Sequence[tuple[np.ndarray, np.ndarray]]
) -> training.TrainState:
    """state with the kernel [F, W] and bias [W] of the last len(layers) Linear layers of its model's head replaced
    (one: the last layer); ValueError if they do not fit."""
    model = state.model()
    linears = head_layers(model)
    if not 0 < len(layers) <= len(linears):
        raise ValueError(f"{len(layers)} refitted layers do not fit a head of {len(linears)} Linear layers")
    for layer, (kernel, bias) in zip(linears[-len(layers) :], layers, strict=True):
        if np.shape(kernel) != layer.kernel.shape or np.shape(bias) != layer.bias.shape:
            raise ValueError(
                f"a layer of kernel {np.shape(kernel)} and bias {np.shape(bias)} does not fit the model's "
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
        module = without_head(model)
        return _hidden(module, model(batch["image"])).astype(jnp.float32)

    return jax.jit(feature_step)


def _make_head_input_step() -> Callable[[training.TrainState, training.Batch], jax.Array]:
    """A jit-compiled `step(state, batch) -> [batch, F0]` (float32): what the head reads, in eval mode."""

    def head_input_step(state: training.TrainState, batch: training.Batch) -> jax.Array:
        model = state.model(train=False)
        without_head(model)
        return model(batch["image"]).astype(jnp.float32)

    return jax.jit(head_input_step)


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


Layers = list[tuple[np.ndarray, np.ndarray]]


def fine_tune_head(
    module: nnx.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    on_epoch: Callable[[int, nnx.Module], None],
    *,
    epochs: int = HEAD_EPOCHS,
    lr: float = HEAD_LR,
    batch_size: int = HEAD_BATCH,
) -> None:
    """Trains a copy of the head module (its trained weights the start) with Adam on the mean squared error from
    inputs [N, F0] (what it reads) to targets [N, W], in shuffled batches (the rows past the last whole batch left
    out of each epoch), and calls on_epoch(epoch, head) after each epoch. The same inputs give the same heads."""
    graphdef, params = nnx.split(module, nnx.Param)
    optimizer = optax.adam(lr)

    @jax.jit
    def update(params, opt_state, x, y):
        grads = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x).astype(jnp.float32) - y) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state, rng = optimizer.init(params), np.random.default_rng(0)
    batch_size = min(batch_size, len(inputs))
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(inputs))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            params, opt_state = update(params, opt_state, jnp.asarray(inputs[rows]), jnp.asarray(targets[rows]))
        on_epoch(epoch, nnx.merge(graphdef, params))


@dataclasses.dataclass(frozen=True)
class Refit:
    """What `refit_head` found: the kernel [F, W] and bias [W] of each of the head's last len(layers) Linear layers
    (one: the last layer solved by least squares; all: the head fine-tuned), how (method None: as trained), and the
    validation score as trained and with them."""

    layers: Layers
    method: str | None  # "least squares", "fine-tuned" or None
    ridge: float | None  # least squares
    epochs: int | None  # fine-tuned
    trained_score: float
    score: float
    examples: int  # training rows the refit saw


def _layers_of(module: nnx.Module) -> Layers:
    return [
        (np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64))
        for layer in _linears(module)
    ]


def refit_head(
    state: training.TrainState,
    train_batches: Iterable[training.Batch],
    validation_batches: Iterable[training.Batch],
    score: Callable[[list[np.ndarray], np.ndarray], float],
    mesh: Mesh,
    *,
    views: Sequence[np.ndarray] = SYMMETRIES[:1],
    ridges: Sequence[float] = RIDGES,
    epochs: int = HEAD_EPOCHS,
    each_epoch: Callable[[int], None] | None = None,
) -> Refit:
    """Refits the head of state's model (its parameters as evaluated: pass `with_ema_params(state)`) on what it reads
    from the training batches' images, to their encoded targets ("target"): its last layer solved by least squares
    for each ridge, and where the head has hidden layers the whole head fine-tuned (`fine_tune_head`) for each of
    1 … epochs epochs; keeps what scores highest on the validation batches, the head as trained included.

    score(outputs, true) -> the figure to maximise: outputs is one [N, W] array of encoded outputs per view (the
    validation images moved by each of views, as evaluate.py's test-time augmentation reads them), true the
    batches' "raw_target" [N, P] where they carry it (a TargetEncoding's batches), else their "target". Multi-process
    runs: every process passes its own rows and gets the same answer. each_epoch(epoch) is called after each epoch
    of the fine-tuning (a progress bar; it may raise to stop).
    """
    input_step = _make_head_input_step()

    def inputs(batch: training.Batch) -> np.ndarray:
        return training.process_local(input_step(state, training.shard_batch(batch, mesh)))

    (train_x,), train_y = _real_rows(
        train_batches,
        SYMMETRIES[:1],
        inputs,
        lambda batch: batch["target"],
        "the training split is empty: nothing to refit the head on",
    )
    per_view, true = _real_rows(
        validation_batches,
        views,
        inputs,
        lambda batch: batch.get("raw_target", batch["target"]),
        "the validation split is empty: nothing to choose the refit on",
    )

    module = head(state.model(train=False))
    apply = nnx.jit(lambda module, x: module(x).astype(jnp.float32))
    trained_score = score([np.asarray(apply(module, view), np.float64) for view in per_view], true)
    best = Refit(_layers_of(module)[-1:], None, None, None, trained_score, trained_score, len(train_x))

    hidden = nnx.jit(lambda module, x: _hidden(module, x).astype(jnp.float32))
    features = [np.asarray(hidden(module, view), np.float64) for view in per_view]
    for ridge, (kernel, bias) in zip(ridges, _least_squares(hidden, module, train_x, train_y, ridges), strict=True):
        fitted = score([view @ kernel + bias for view in features], true)
        if fitted > best.score:
            best = dataclasses.replace(
                best, layers=[(kernel, bias)], method="least squares", ridge=float(ridge), score=fitted
            )
    if _has_hidden(module):

        def on_epoch(epoch: int, tuned: nnx.Module) -> None:
            nonlocal best
            fitted = score([np.asarray(apply(tuned, view), np.float64) for view in per_view], true)
            if fitted > best.score:
                best = dataclasses.replace(
                    best, layers=_layers_of(tuned), method="fine-tuned", ridge=None, epochs=epoch, score=fitted
                )
            if each_epoch is not None:
                each_epoch(epoch)

        fine_tune_head(module, train_x, train_y, on_epoch, epochs=epochs)
    return best


def _least_squares(hidden, module, inputs: np.ndarray, targets: np.ndarray, ridges: Sequence[float]) -> Layers:
    """The last layer solved for each ridge, the sums added 4,096 rows at a time (in float64)."""
    sums = None
    for start in range(0, len(inputs), 4096):
        rows = NormalEquations.of(hidden(module, inputs[start : start + 4096]), targets[start : start + 4096])
        sums = rows if sums is None else jax.tree.map(operator.add, sums, rows)
    return sums.solve(ridges)


def _real_rows(
    batches: Iterable[training.Batch],
    views: Sequence[np.ndarray],
    inputs: Callable[[training.Batch], np.ndarray],
    field: Callable[[training.Batch], np.ndarray],
    empty: str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """inputs(batch) for the batches' images moved by each of views, and field(batch): the real (unmasked) rows of
    every process, in the order of their index in the split (of the batches where they carry none), so every process
    gets the same rows in the same order as one process would. ValueError(empty) when there are no batches."""
    per_view, values, masks, order = [[] for _ in views], [], [], []
    for batch in batches:
        masks.append(np.asarray(batch["mask"]) > 0)
        values.append(np.asarray(field(batch)))
        seen = sum(map(len, order))
        order.append(np.asarray(batch["index"]) if "index" in batch else seen + np.arange(len(masks[-1])))
        for rows, view in zip(per_view, views, strict=True):
            rows.append(inputs(dict(batch, image=transform_images(batch["image"], view))))
    if not masks:
        raise ValueError(empty)
    # Gathered padded, as every process reads as many rows; the real ones kept after.
    real = _gathered(np.concatenate(masks))
    keep = np.flatnonzero(real)[np.argsort(_gathered(np.concatenate(order))[real], kind="stable")]
    return [_gathered(np.concatenate(rows))[keep] for rows in per_view], _gathered(np.concatenate(values))[keep]


def _gathered(rows: np.ndarray) -> np.ndarray:
    """Every process's rows, process by process (each process reads as many padded evaluation rows)."""
    if jax.process_count() == 1:
        return rows
    return np.asarray(multihost_utils.process_allgather(rows, tiled=True))
