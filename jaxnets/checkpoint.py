"""Checkpoints with orbax: the two latest and the best (lowest validation loss) TrainState of a run,
each with a JSON record of where training stood (epoch, batch, partial sums).

Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-write
leaves the previous checkpoint intact; incomplete folders are never listed as steps. The checkpoint before the
latest is kept too, so a latest one damaged later (a disk error, a copy cut short) still leaves one to resume from
(`restore_newest_intact`). A save is refused before it starts when the disk lacks the room for it, and a save that
fails anyway raises CheckpointSaveError naming the folder; the checkpoints already there stay intact.
"""

import glob
import math
import os
import shutil
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxnets.training import TrainState

CHECKPOINT_DIR = "checkpoints"
# Beyond the arrays' own bytes, room for orbax's metadata and the JSON record.
SPACE_MARGIN_BYTES = 64 << 10


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (no space, a read-only folder, a quota); earlier ones are intact."""

    exit_code = 4


def _key_data(tree: Any) -> Any:
    # Typed PRNG keys (dropout RNG state) are stored as their raw uint32 data.
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _validation_loss(metrics: dict) -> float:
    # A NaN loss would break the ordering; a diverged step is never the best.
    loss = float(metrics["validation_loss"])
    return loss if math.isfinite(loss) else math.inf


def _drop_closed_loop_callbacks() -> None:
    """Keeps a failed restore's message clean. When one array of a checkpoint cannot be read, orbax's restore
    stops and closes its asyncio loop while tensorstore's other reads are still running; each of them then calls
    back into the closed loop and Python reports that RuntimeError as unraisable: a traceback on stderr per array,
    after our one-line message. Those reports alone are dropped; every other one reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    """An orbax or tensorstore error in one line of at most 500 characters."""
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def _saveable(state: TrainState) -> dict:
    return {"params": state.params, "rest": _key_data(state.rest), "opt_state": state.opt_state, "step": state.step}


class Checkpointer:
    """Keeps the two latest checkpoints and the best by validation loss in `<workdir>/checkpoints`."""

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
                checkpoint_managers.LatestN(n=2),  # the previous one too, in case the latest is later damaged
                # Mid-epoch (interrupt) checkpoints carry no validation loss: kept only while among the two latest.
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
        self._failure = False

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
        """Starts an asynchronous save of state and record (JSON) at step state.step.

        Waits for the previous save first (its failure is raised here). Raises CheckpointSaveError, before writing
        anything, if the disk has less free space than the state's bytes, or if orbax refuses the save.
        """
        step = int(jax.device_get(state.step))
        self.wait()
        saveable = _saveable(state)
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(saveable)) + SPACE_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointSaveError(
                f"not enough space to save checkpoint step {step} in {self.directory}: about {needed / 1e6:.1f} MB "
                f"needed, {free / 1e6:.1f} MB free. Free some space (or move the workdir) and resume with the same "
                "command; the checkpoints already there are intact."
            )
        metrics = None if validation_loss is None else {"validation_loss": float(validation_loss)}
        try:
            self.manager.save(
                step,
                metrics=metrics,
                force=True,
                args=ocp.args.Composite(state=ocp.args.StandardSave(saveable), record=ocp.args.JsonSave(record)),
            )
        except Exception as error:  # orbax and tensorstore raise many types for an unwritable folder
            raise self._failed(error) from None

    def _failed(self, error: BaseException) -> CheckpointSaveError:
        self._failure = True
        message = _first_line(error)
        return CheckpointSaveError(
            f"saving a checkpoint in {self.directory} failed: {message}. The checkpoints already there are "
            "intact; fix the cause (space, permissions, quota) and resume with the same command."
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
        _drop_closed_loop_callbacks()  # before: the callbacks may come before orbax's error reaches us
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
            )
        except Exception as error:  # orbax/tensorstore raise many types for damaged or foreign files
            message = _first_line(error)
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

    def restore_newest_intact(self, template: TrainState) -> tuple[TrainState, dict, list[str]]:
        """Restores the latest checkpoint, or, if it is damaged, the newest one that restores; returns
        (state, record, one warning per damaged checkpoint skipped). Raises ValueError if none restores."""
        skipped = []
        for step in sorted(self.steps(), reverse=True):
            try:
                state, record = self.restore(template, step)
            except ValueError as error:
                skipped.append(f"{error}; falling back to the checkpoint before it")
                continue
            return state, record, skipped
        raise ValueError("no checkpoint in " + self.directory + " restores:\n  " + "\n  ".join(skipped))

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def wait(self) -> None:
        """Blocks until the pending save is written; raises CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # the background save's own error, re-raised by orbax here
            raise self._failed(error) from None

    def close(self) -> None:
        """Waits for the pending save and closes the manager (after a failed save, without raising again)."""
        try:
            if not self._failure:
                self.wait()
        finally:
            self.manager.close()


REFIT_DIR = "refitted_head"
_LEGACY_REFIT_DIR = "refitted_last_layer"  # runs refitted before the whole head could be: the last layer alone


class RefitCheckpointer:
    """The head of a checkpoint refitted on its features (`jaxnets.refit`), in `<workdir>/refitted_head/<step>`: the
    kernel and bias of each layer it replaces (the head's last ones) beside a JSON record of how it was chosen. Only
    the newest is kept; evaluation uses it for the checkpoint of the same step."""

    def __init__(self, workdir: str, *, read_only: bool = False, folder: str = REFIT_DIR):
        self.directory = os.path.abspath(os.path.join(workdir, folder))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, read_only=read_only, create=not read_only, cleanup_tmp_directories=not read_only
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, layers: list[tuple[Any, Any]], record: dict) -> None:
        """Writes the layers for checkpoint step (in place of those saved before for it) and waits until they are
        written; CheckpointSaveError if it fails."""
        arrays = [
            {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)} for kernel, bias in layers
        ]
        try:
            if step in self.steps():  # a damaged one: replaced
                self.manager.delete(step)
            self.manager.save(
                step,
                force=True,
                args=ocp.args.Composite(head=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)),
            )
            self.manager.wait_until_finished()
        except Exception as error:  # orbax and tensorstore raise many types for an unwritable folder
            message = _first_line(error)
            raise CheckpointSaveError(f"saving the refitted head in {self.directory} failed: {message}") from None

    def restore(self, step: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict] | None:
        """(layers, record) of the head refitted for checkpoint step, layers a list of (kernel, bias), the head's last
        ones; None when there is none; ValueError when it cannot be read."""
        if step not in self.steps():
            return None
        _drop_closed_loop_callbacks()
        legacy = os.path.isdir(os.path.join(self.directory, str(step), "layer"))  # one layer, saved as "layer"
        item = "layer" if legacy else "head"
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}, record=ocp.args.JsonRestore())
            )
        except Exception as error:  # orbax/tensorstore raise many types for damaged files
            message = _first_line(error)
            raise ValueError(f"the refitted head of step {step} in {self.directory} is damaged: {message}") from None
        arrays = [restored[item]] if legacy else restored[item]
        return [(np.asarray(layer["kernel"]), np.asarray(layer["bias"])) for layer in arrays], dict(restored.record)

    def close(self) -> None:
        self.manager.close()


def read_refit(workdir: str, step: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict] | None:
    """The head refitted for checkpoint step of the run in workdir, as `RefitCheckpointer.restore`; None when the run
    has none."""
    for folder in (REFIT_DIR, _LEGACY_REFIT_DIR):
        if os.path.isdir(os.path.join(workdir, folder)):
            store = RefitCheckpointer(workdir, read_only=True, folder=folder)
            try:
                return store.restore(step)
            finally:
                store.close()
    return None
