"""What a run shows and records while it trains, as small objects at the edge of the training loop:
stop signals, the per-epoch progress bar, and the metrics writer (metrics.jsonl and TensorBoard).
"""

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator

import jax
from tqdm import tqdm

from jaxnets import training
from jaxnets.config import Config

METRICS_FILE = "metrics.jsonl"
# The running loss and the NaN check read device values: one host sync every this many steps, not every step.
CHECK_EVERY = 20
# Tests set this to a step number: training pauses after that step until a signal arrives, so signal tests
# interrupt at a known step instead of racing the epoch.
PAUSE_AT_STEP_ENV = "JAXNETS_PAUSE_AT_STEP"


class StopSignals:
    """Records SIGINT/SIGTERM instead of dying mid-step; a second SIGINT exits at once.

    Used as a context manager around the training loop; `received` is the first signal, if any.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            # Orbax finalises checkpoints by rename, so exiting now cannot corrupt the last complete one.
            print("\nSecond interrupt: exiting now.", file=sys.stderr, flush=True)
            os._exit(130)
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing the step and saving a checkpoint "
            "(Ctrl-C again to exit at once).",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.received or 0)

    def pause(self, step: int, timeout: float = 300.0) -> None:
        """Waits (up to timeout seconds) for a signal; announces the step on stderr first."""
        print(f"paused after step {step} for a signal ({PAUSE_AT_STEP_ENV})", file=sys.stderr, flush=True)
        deadline = time.monotonic() + timeout
        while self.received is None and time.monotonic() < deadline:
            time.sleep(0.01)


class Progress:
    """One epoch's progress bar, and whether to go on: call it after every step as train_epoch's on_step.

    Every CHECK_EVERY steps it shows the running loss and images/s and, with stop_on_nan, stops at a NaN/Inf
    loss; after any step it stops once a signal has been received. Each call first waits for the step queued before
    this one, so the bar moves as the steps finish, not as they are queued (up to CHECK_EVERY of them at once), while
    the device always has the next step to run.
    """

    def __init__(self, config: Config, epoch: int, start_batch: int, total: int, stop: StopSignals, *, show: bool):
        """config: the run's (epochs, batch size, on_nan); start_batch of total batches are done; show: draw the bar."""
        self.batch = start_batch  # batches of this epoch done so far
        self.batch_size = config.batch_size
        self.stop = stop
        self.stop_on_nan = config.on_nan == "stop"
        self.bar = tqdm(
            total=total,
            initial=start_batch,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not show,
            dynamic_ncols=True,
        )
        pause = os.environ.get(PAUSE_AT_STEP_ENV)
        self.pause_at = int(pause) if pause else None
        self.queued = None  # the metrics of the step queued last (the state's own arrays are donated to the next)

    def __call__(self, state: training.TrainState, totals: training.Metrics) -> bool:
        jax.block_until_ready(self.queued)
        self.queued = totals
        self.batch += 1
        self.bar.update(1)
        if self.pause_at is not None and int(state.step) == self.pause_at:
            self.stop.pause(self.pause_at)
        if self.batch % CHECK_EVERY == 0:
            summary = training.summarize(totals)
            rate = self.bar.format_dict["rate"] or 0.0
            self.bar.set_postfix(loss=f"{summary['loss']:.4g}", img_s=f"{rate * self.batch_size:.1f}")
            if summary["nonfinite"] and self.stop_on_nan:
                return False
        return self.stop.received is None

    def close(self) -> None:
        self.bar.close()


class DataWait:
    """Wraps an epoch's batch iterator and times how long the loop waits for each batch: the train step's device
    sits idle meanwhile. `check(seconds)` warns, once per run, when the waits took more than WARN_FRACTION of the
    epoch's training time (and at least MIN_WAIT_SECONDS)."""

    WARN_FRACTION = 0.10
    MIN_WAIT_SECONDS = 0.5  # sub-second epochs of tiny models are not worth a warning

    def __init__(self, read_threads: int):
        self.read_threads = read_threads
        self.waited = 0.0
        self.warned = False

    def wrap(self, batches: Iterator) -> Iterator:
        """Yields the batches, adding up the waits for all but the first (which includes starting the readers)."""
        self.waited = 0.0
        iterator = iter(batches)
        first = True
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if not first:
                self.waited += time.perf_counter() - started
            first = False
            yield batch

    def check(self, epoch: int, seconds: float) -> None:
        if self.warned or seconds <= 0 or self.waited <= max(self.WARN_FRACTION * seconds, self.MIN_WAIT_SECONDS):
            return
        self.warned = True
        warnings.warn(
            f"the train step waited on data for {self.waited / seconds:.0%} of epoch {epoch}'s training time: the "
            f"data source is slower than the model; raise --read-threads (now {self.read_threads}) to read ahead "
            "with more threads",
            stacklevel=2,
        )


def read_history(workdir: str, completed_epochs: int) -> list[dict]:
    """metrics.jsonl records of the epochs a checkpoint covers (later lines are from a lost tail)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash while it was appended
                continue
    return [r for r in records if r["epoch"] <= completed_epochs]


class MetricWriter:
    """Appends one JSON line per epoch to <workdir>/metrics.jsonl and the losses to TensorBoard (when
    tensorboardX is installed); only process 0 writes (big_vision's BigVisionMetricWriter).

    Starts from `history`, the records a resumed checkpoint covers: metrics.jsonl is rewritten to them first,
    dropping epochs whose checkpoint was lost.
    """

    def __init__(self, workdir: str, history: list[dict], *, enabled: bool):
        self.history = list(history)
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self.tensorboard = _tensorboard(workdir) if enabled else None
        if enabled:
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in self.history)
            os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss/train", record["loss"], record["epoch"])
            self.tensorboard.add_scalar("loss/validation", record["validation_loss"], record["epoch"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(workdir: str):
    # tensorboardX imports torch, when installed, only to recognise its tensors (3.4 s of a run's start here);
    # we log floats, so it is imported with torch hidden, unless torch is loaded already (--init-from a .pth).
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(os.path.join(workdir, "tensorboard"))
