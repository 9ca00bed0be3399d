"""Checkpoints with orbax: the latest and the best (lowest validation loss) TrainState of a run,
each with a JSON record of where training stood (epoch, batch, partial sums).

Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-write
leaves the previous checkpoint intact; incomplete folders are never listed as steps.
"""

import glob
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxnets.training import TrainState

CHECKPOINT_DIR = "checkpoints"


def _key_data(tree: Any) -> Any:
    # Typed PRNG keys (dropout RNG state) are stored as their raw uint32 data.
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _validation_loss(metrics: dict) -> float:
    # A NaN loss would break the ordering; a diverged step is never the best.
    loss = float(metrics["validation_loss"])
    return loss if math.isfinite(loss) else math.inf


def _saveable(state: TrainState) -> dict:
    return {"params": state.params, "rest": _key_data(state.rest), "opt_state": state.opt_state, "step": state.step}


class Checkpointer:
    """Keeps the latest checkpoint and the best by validation loss in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        unfinished = sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")))
        if unfinished:
            # Left by a crash or kill during a save; orbax never lists them as steps.
            warnings.warn(
                f"ignoring {len(unfinished)} unfinished checkpoint folder(s) in {self.directory} "
                f"(a save was interrupted): {', '.join(map(os.path.basename, unfinished))}",
                stacklevel=2,
            )
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=1),
                # Mid-epoch (interrupt) checkpoints carry no validation loss and are kept only while latest.
                checkpoint_managers.BestN(
                    get_metric_fn=_validation_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        # best_fn is what makes orbax write each step's metrics to disk and read them back when a run is
        # reopened; with the preservation policy alone they lived in memory only, so after a restart every
        # earlier step looked "without metrics" and the next save deleted the best one.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_validation_loss,
            best_mode="min",
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest validation loss (None if no checkpoint has one)."""
        return self.manager.best_step()

    def validation_loss(self, step: int) -> float | None:
        """The validation loss saved with step (None for a mid-epoch checkpoint)."""
        metrics = self.manager.metrics(step)
        return None if metrics is None else float(metrics["validation_loss"])

    def save(self, state: TrainState, record: dict, validation_loss: float | None = None) -> None:
        """Starts an asynchronous save of state and record (JSON) at step state.step."""
        step = int(jax.device_get(state.step))
        metrics = None if validation_loss is None else {"validation_loss": float(validation_loss)}
        self.manager.save(
            step,
            metrics=metrics,
            force=True,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_saveable(state)), record=ocp.args.JsonSave(record)),
        )

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Loads step (default: the latest) into the structure of template; returns (state, record).

        Raises ValueError naming the available steps if step does not exist, or explaining a
        mismatch between the checkpoint and the model being restored.
        """
        available = self.steps()
        step = self.latest_step() if step is None else step
        if step is None or step not in available:
            raise ValueError(
                f"no checkpoint at step {step} in {self.directory}; available steps: {available or 'none'}"
            )
        target = _saveable(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
            )
        except Exception as error:  # orbax/tensorstore raise many types for damaged or foreign files
            message = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match this model or is damaged: {message}"
            ) from None
        loaded = restored.state
        rest = jax.tree.map(
            lambda old, new: (
                jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                if jnp.issubdtype(old.dtype, jax.dtypes.prng_key)
                else new
            ),
            template.rest,
            loaded["rest"],
        )
        state = template.replace(params=loaded["params"], rest=rest, opt_state=loaded["opt_state"], step=loaded["step"])
        return state, dict(restored.record)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
