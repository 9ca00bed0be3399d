"""The lecture's training and test loops as pure JAX: a TrainState pytree, a jit-compiled train step
applying an optax optimiser, a no-gradient eval step, and the epoch loops that drive them.

The PyTorch loop `optimizer.zero_grad(); loss = criterion(model(images), targets); loss.backward();
optimizer.step()` becomes one function: `jax.value_and_grad(loss)` -> `tx.update` -> `optax.apply_updates`.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnets import conv
from jaxnets.step_cache import StepCache, lower_cached

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# torchvision's reference training weights the auxiliary classifier's loss by 0.4.
AUX_LOSS_WEIGHT = 0.4
NO_STEP = np.iinfo(np.int32).max
# Batch entries for the host only (reports), never sent to the devices.
HOST_ONLY = ("index", "raw_target")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    graphdef: the model's structure (static); params: its nnx.Param leaves; rest: every other model
    variable (BatchNorm running statistics, dropout RNG state); opt_state: the optimiser's state;
    step: the number of updates applied so far.
    """

    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformationExtraArgs = flax.struct.field(pytree_node=False)
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    step: jax.Array

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation) -> "TrainState":
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Extra-args support lets schedules such as reduce_on_plateau receive the loss (value=...).
        tx = optax.with_extra_args_support(tx)
        # Jitted: eagerly, every zeros_like compiles once per parameter shape (2.4 s for Inception3's Adam; 0.9 s).
        opt_state = jax.jit(tx.init)(params)
        return cls(
            graphdef=graphdef, tx=tx, params=params, rest=rest, opt_state=opt_state, step=jnp.zeros((), jnp.int32)
        )

    def model(self, *, train: bool = False) -> nnx.Module:
        """A fresh NNX model holding a copy of this state, in train or eval mode."""
        model = nnx.merge(self.graphdef, self.params, self.rest, copy=True)
        model.train() if train else model.eval()
        return model


class ParamsEmaState(NamedTuple):
    count: jax.Array
    ema: optax.Params


def params_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimiser state (so checkpoints and
    resuming carry it): after each update, ema <- d * ema + (1 - d) * params, with d = min(decay, (1 + t) /
    (10 + t)) at update t so that the initial weights fade out early (timm's warm-up). Updates pass unchanged;
    chain it after the optimiser. `with_ema_params(state)` evaluates with the average.
    """

    def init(params: optax.Params) -> ParamsEmaState:
        return ParamsEmaState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: p.astype(jnp.float32), params))

    def update(updates, state: ParamsEmaState, params=None):
        new_params = optax.apply_updates(params, updates)
        count = state.count.astype(jnp.float32)
        rate = jnp.minimum(decay, (1 + count) / (10 + count))
        ema = jax.tree.map(lambda e, p: rate * e + (1 - rate) * p.astype(e.dtype), state.ema, new_params)
        return updates, ParamsEmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def with_ema_params(state: TrainState) -> TrainState:
    """The state with its parameters replaced by their moving average, when the optimiser keeps one
    (`params_ema`); else the state itself."""
    found = optax.tree_utils.tree_get_all_with_path(state.opt_state, ParamsEmaState.__name__)
    if not found:
        return state
    ((_, ema_state),) = found
    return state.replace(params=jax.tree.map(lambda e, p: e.astype(p.dtype), ema_state.ema, state.params))


def _targets(batch: Batch) -> jax.Array:
    return batch["target"] if "target" in batch else batch["label"]


def _sums(loss: jax.Array, mask: jax.Array) -> Metrics:
    """A batch's mean loss as sum and count, so epoch means weight every example equally
    (the seed's `tloss += loss.item() * len(images)`)."""
    count = jnp.sum(mask)
    return {"loss_sum": loss * count, "count": count, "nonfinite": (~jnp.isfinite(loss)).astype(jnp.int32)}


def make_train_step(
    loss_fn: LossFn, *, donate: bool = True
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns a jit-compiled `train_step(state, batch) -> (state, metrics)` (see `train_step_function`). With
    donate=True the old state's buffers are reused."""
    return jax.jit(
        train_step_function(loss_fn),
        donate_argnums=(0,) if donate else (),
        compiler_options=train_step_compiler_options(),
    )


def lower_train_step(
    loss_fn: LossFn, state: TrainState, batch: Batch, cache: StepCache | None = None, shaped_by: dict | None = None
) -> Callable[[], Callable[[TrainState, Batch], tuple[TrainState, Metrics]]]:
    """The train step lowered for these inputs: jit's own trace, or with a step cache (`jaxnets.step_cache`) the
    trace it keeps under the inputs and `shaped_by`. Returns `compile()`, which gives the step."""
    if cache is None:
        return make_train_step(loss_fn).lower(state, batch).compile
    return lower_cached(
        train_step_function(loss_fn),
        state,
        batch,
        cache,
        shaped_by or {},
        compiler_options=train_step_compiler_options(),
    )


def train_step_compiler_options() -> dict[str, str] | None:
    """Where convolutions are im2col, their backward builds the columns again instead of keeping the forward's."""
    return dict(conv.COMPILER_OPTIONS) if conv.cpu_tuned() else None


def train_step_function(loss_fn: LossFn) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, one Adam (or the state's optimiser) update, not compiled.

    batch: {"image": [B, H, W, C], "target": [B, P] or "label": [B], "mask": [B]}. The model runs in
    train mode (batch statistics, dropout); a model returning (outputs, aux_outputs) is trained on
    loss + 0.4 * aux loss, torchvision's convention. Predictions are cast to float32 before the loss,
    so bf16 models keep a float32 loss.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        targets, mask = _targets(batch), batch["mask"]

        def compute_loss(params):
            model = nnx.merge(state.graphdef, params, state.rest, copy=True)
            model.train()
            outputs = model(batch["image"])
            aux_loss = 0.0
            if isinstance(outputs, tuple):
                outputs, aux_outputs = outputs
                aux_loss = loss_fn(aux_outputs.astype(jnp.float32), targets, mask)
            loss = loss_fn(outputs.astype(jnp.float32), targets, mask)
            return loss + AUX_LOSS_WEIGHT * aux_loss, (loss, nnx.state(model, nnx.Not(nnx.Param)))

        (total, (loss, rest)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=total)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1)
        metrics = _sums(loss, mask)
        # Which step first went bad, kept on the device (min over the epoch): no host sync per step.
        metrics["first_nonfinite_step"] = jnp.where(jnp.isfinite(loss), NO_STEP, new_state.step)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, *, with_predictions: bool = False) -> Callable:
    """Returns a jit-compiled `eval_step(state, batch) -> metrics` (or `(metrics, predictions)`).

    The lecture's `with torch.no_grad(): model.eval(); outputs = model(images)`: eval mode (running
    BatchNorm statistics, no dropout), and no gradient is computed because none is asked for.
    Padded rows (mask 0) add nothing to the sums.
    """

    def eval_step(state: TrainState, batch: Batch):
        outputs = state.model(train=False)(batch["image"]).astype(jnp.float32)
        metrics = _sums(loss_fn(outputs, _targets(batch), batch["mask"]), batch["mask"])
        return (metrics, outputs) if with_predictions else metrics

    return jax.jit(eval_step)


# ---------------------------------------------------------------------------------------------
# Devices: batches split over a data axis, state replicated.


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named 'data' over all devices (every process's, in multi-host runs)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of tree on all devices of mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def replicated_shapes(create: Callable[[], Any], mesh: Mesh) -> Any:
    """What `replicate(create(), mesh)` would be, as shapes, dtypes and shardings only: `create` is traced, nothing is
    allocated. A step lowered and compiled for these takes the real tree later, so the compiler's memory and the
    state's need not be held at once."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), jax.eval_shape(create)
    )


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """This process's rows of a global batch -> global arrays split along the 'data' axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
        if key not in HOST_ONLY
    }


def _accumulate(total: Metrics | None, metrics: Metrics) -> Metrics:
    # Stays on the device: no host sync per step. Sums, except the first bad step (a minimum).
    if total is None:
        return metrics
    return {
        key: jnp.minimum(total[key], value) if key.startswith("first_") else total[key] + value
        for key, value in metrics.items()
    }


def summarize(total: Metrics | None) -> dict[str, float]:
    """Device sums -> {"loss": sum / count, "count": ..., "nonfinite": ...} on the host."""
    if total is None:
        return {"loss": float("nan"), "count": 0, "nonfinite": 0}
    total = jax.device_get(total)
    count = float(total["count"])
    summary = {
        "loss": float(total["loss_sum"]) / max(count, 1.0),
        "count": int(count),
        "nonfinite": int(total["nonfinite"]),
    }
    if "first_nonfinite_step" in total and int(total["first_nonfinite_step"]) != NO_STEP:
        summary["first_nonfinite_step"] = int(total["first_nonfinite_step"])
    return summary


def train_epoch(
    state: TrainState,
    batches: Iterable[Batch],
    train_step: Callable,
    mesh: Mesh,
    *,
    totals: Metrics | None = None,
    on_step: Callable[[TrainState, Metrics], bool] | None = None,
) -> tuple[TrainState, Metrics | None, bool]:
    """One pass over batches. Returns (state, accumulated device metrics, finished).

    on_step(state, totals) is called after every step (for progress bars and signals); returning
    False stops the epoch early (finished=False), e.g. to checkpoint and exit on SIGTERM.
    """
    for batch in batches:
        state, metrics = train_step(state, shard_batch(batch, mesh))
        totals = _accumulate(totals, metrics)
        if on_step is not None and not on_step(state, totals):
            return state, totals, False
    return state, totals, True


def evaluate(
    state: TrainState,
    batches: Iterable[Batch],
    eval_step: Callable,
    mesh: Mesh,
    *,
    with_predictions: bool = False,
) -> dict[str, Any]:
    """The no-grad test loop over padded, masked batches.

    Returns {"loss", "count", ...}; with_predictions, also "predictions" [N, W], "targets" ("raw_target" [N, P]
    when the batches carry it, else "target" [N, W]) or
    [N] and "index" [N] for the real (unmasked) rows of this process, in the order of the batches.
    """
    totals, predictions, targets, indices = None, [], [], []
    for batch in batches:
        result = eval_step(state, shard_batch(batch, mesh))
        if with_predictions:
            result, outputs = result
            keep = np.asarray(batch["mask"]) > 0
            local = process_local(outputs)
            predictions.append(local[keep])
            targets.append(np.asarray(batch.get("raw_target", _targets(batch)))[keep])
            indices.append(np.asarray(batch["index"])[keep])
        totals = _accumulate(totals, result)
    summary = summarize(totals)
    if with_predictions:
        summary["predictions"] = np.concatenate(predictions) if predictions else np.zeros((0,))
        summary["targets"] = np.concatenate(targets) if targets else np.zeros((0,))
        summary["index"] = np.concatenate(indices) if indices else np.zeros((0,), np.int64)
    return summary


def process_local(array: jax.Array) -> np.ndarray:
    """The rows of a 'data'-sharded global array that this process fed in."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def fit(
    state: TrainState,
    train_batches: Callable[[int], Iterable[Batch]],
    epochs: int,
    loss_fn: LossFn,
    *,
    validation_batches: Callable[[], Iterable[Batch]] | None = None,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, TrainState, dict[str, float]]]:
    """The lecture's epoch loop for research code: yields (epoch, state, metrics) after each epoch.

    train_batches(epoch) gives that epoch's batches; validation_batches(), if given, the
    evaluation batches. metrics holds "loss" (the epoch's mean training loss) and "validation_loss".
    """
    mesh = mesh or data_mesh()
    state = replicate(state, mesh)
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    for epoch in range(1, epochs + 1):
        state, totals, _ = train_epoch(state, train_batches(epoch), train_step, mesh)
        metrics = summarize(totals)
        if validation_batches is not None:
            metrics["validation_loss"] = evaluate(with_ema_params(state), validation_batches(), eval_step, mesh)["loss"]
        yield epoch, state, metrics
