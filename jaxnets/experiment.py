"""A whole run from one Config: build data, model and optimiser, train with checkpoints and logs, and
resume where a run stopped (the work behind train.py; jaxnets.evaluation evaluates the saved run).

This module is the edge of the library: it prints, draws progress bars and writes files.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxnets import convert, host_memory, losses, metrics, monitor, refit, report, training
from jaxnets import data as data_lib
from jaxnets.checkpoint import CHECKPOINT_DIR, Checkpointer, RefitCheckpointer, read_refit
from jaxnets.config import Config, format_value
from jaxnets.data import pipeline
from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry
from jaxnets.data.targets import Polar, TargetEncoding, parse_axis_ratios, parse_weights, roulette_pairs
from jaxnets.models import MLP, Inception3
from jaxnets.step_cache import StepCache
from jaxnets.workdir_lock import WorkdirBusy, WorkdirLock

# Programs that compile faster than this are not worth a cache entry (and the disk it takes).
CACHE_MIN_COMPILE_SECONDS = 0.5


class RunError(Exception):
    """A problem the user can fix (bad option, incompatible workdir, diverged run): message + exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def run_command(body: Callable[..., int], *args) -> int:
    """Runs a command-line tool's body and returns its exit code; a problem with the user's input (RunError,
    a bad value, an unreadable file) becomes one line on stderr and exit code 2 (or the error's own), no traceback.
    Warnings print as `warning: ...` lines."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return body(*args)
        except (RunError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return getattr(error, "exit_code", 2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Building blocks from the config


def setup_jax(config: Config) -> None:
    """Multi-host initialisation, the persistent compilation cache, and quiet library logs."""
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax/TFDS info lines would bury the epoch lines
    if config.distributed:
        jax.distributed.initialize()  # reads the coordinator from Slurm (or JAX_COORDINATOR_ADDRESS...)
        jax.devices()  # the processes exchange their devices now, before any of them can fail alone
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(config.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)


def load_data(config: Config) -> data_lib.Dataset:
    return data_lib.load_dataset(
        config.dataset,
        data=config.data,
        simulate=config.simulate,
        image_dir=config.image_dir,
        validation_data=config.validation_data,
        test_data=config.test_data,
        targets=config.targets or None,
        angles=config.angles,
        drop_incomplete=config.drop_incomplete,
        image_size=config.image_size,
        num_train=config.num_train,
        num_validation=config.num_validation,
        num_test=config.num_test,
        task=config.task,
        data_dir=config.data_dir,
        seed=config.seed if config.data_seed is None else config.data_seed,
    )


def loss_function(config: Config, dataset: data_lib.Dataset) -> training.LossFn:
    """--loss, by default `default_loss(dataset)`; RunError for one that does not fit the task."""
    name = config.loss or default_loss(dataset)
    if (name == "cross_entropy") != (dataset.task == "classification"):
        raise RunError(f"--loss {name} does not fit the {dataset.task} task of dataset {dataset.name!r}")
    return losses.LOSSES[name]


def default_loss(dataset: data_lib.Dataset) -> str:
    """Cross-entropy for classification; for regression MSE, or Huber when the targets include CosmoSim's roulette
    amplitudes: their heavy tails (1 % of the rows hold most of a high-order amplitude's variance) would take over
    MSE's gradient (docs/cosmosim_runs.md, "With the Huber loss")."""
    if dataset.task == "classification":
        return "cross_entropy"
    if _has_roulette_amplitudes(dataset):
        return "huber"
    return "mse"


def default_lr(dataset: data_lib.Dataset) -> float:
    """2e-3, the lens run's (README, "The default run"); 1e-3 when the targets include CosmoSim's roulette
    amplitudes, where it fits them better on every problem measured (docs/cosmosim_runs.md, "The learning rate for
    roulette amplitudes")."""
    return 1e-3 if _has_roulette_amplitudes(dataset) else 2e-3


def default_pixel_scale(dataset: data_lib.Dataset) -> str:
    """log for CosmoSim's images, whose lensed arcs are mostly a few of 255 (it lifted 23 of 24 R² means over the
    group's three problems: docs/cosmosim_runs.md, "Faint light on a log scale"); linear, the lecture's, for other
    data."""
    return "log" if _is_cosmosim(dataset) else "linear"


def _is_cosmosim(dataset: data_lib.Dataset) -> bool:
    """CosmoSim's output (--data) or images it drew here (--simulate): the datasets named csv:<stem>."""
    return dataset.name.startswith("csv:")


def _has_roulette_amplitudes(dataset: data_lib.Dataset) -> bool:
    return dataset.task == "regression" and any(
        data_lib.cosmosim.ROULETTE_AMPLITUDE.fullmatch(name) for name in dataset.target_names
    )


def target_weights(config: Config, dataset: data_lib.Dataset) -> dict[str, float]:
    """--target-weights as {target: weight} (default: the lens dataset's theta:2 when theta is a target; none for
    other data)."""
    lens_default = data_lib.lens.LOSS_WEIGHTS if "theta" in dataset.target_names else ()
    return _target_option("--target-weights", config.target_weights, lens_default, dataset, parse_weights, "weights")


def angle_axes(config: Config, dataset: data_lib.Dataset) -> dict[str, tuple[str, str]]:
    """--angle-axes as {angle: (minor, major)} (default: the lens dataset's theta:sigma2/sigma when its targets
    include all three; none for other data)."""
    wanted = {"theta", "sigma", "sigma2"} <= set(dataset.target_names) and "theta" in dataset.angles
    lens_default = data_lib.lens.ANGLE_AXES if wanted else ()
    return _target_option("--angle-axes", config.angle_axes, lens_default, dataset, parse_axis_ratios, "axis_ratios")


def polar_amplitudes(config: Config, dataset: data_lib.Dataset) -> tuple[Polar, ...]:
    """The roulette amplitude pairs trained in polar form: all of them with --amplitudes polar, else none.
    RunError when polar form is asked for targets without roulette amplitudes."""
    if config.amplitudes != "polar":
        return ()
    pairs = roulette_pairs(dataset.target_names) if dataset.task == "regression" else ()
    if not pairs:
        raise RunError(
            f"--amplitudes polar: the {dataset.task} targets of {dataset.name!r} include no roulette amplitudes "
            "alpha[m][s] / beta[m][s]"
        )
    return pairs


def _target_option(
    flag: str,
    declared: tuple[str, ...] | None,
    lens_default: tuple[str, ...],
    dataset: data_lib.Dataset,
    parse: Callable[[tuple[str, ...]], dict],
    encoding_argument: str,
) -> dict:
    """An option on the regression targets, parsed and checked against them by Dataset.target_encoding's
    encoding_argument. declared None: lens_default on the lens dataset's regression, none for other data.
    RunError naming flag for a bad declaration or one on a classification run."""
    if declared is None:
        declared = lens_default if dataset.name == "lens" and dataset.task == "regression" else ()
    if not declared:
        return {}
    if dataset.task != "regression":
        raise RunError(f"{flag} applies to regression targets; dataset {dataset.name!r} is {dataset.task}")
    try:
        parsed = parse(declared)
        dataset.target_encoding(standardize=False, **{encoding_argument: parsed})  # checks the names
    except ValueError as error:
        raise RunError(f"{flag}: {error}") from None
    return parsed


# The Config fields whose default depends on the data
DATA_DEFAULTS = ("loss", "dropout", "target_weights", "angle_axes", "lr", "amplitudes", "pixel_scale", "refit_head")


def with_data_defaults(config: Config, dataset: data_lib.Dataset, saved: Config | None = None) -> Config:
    """config with the defaults that depend on the data (DATA_DEFAULTS) written out. A run saves this, so that
    evaluating or resuming it later uses what it was trained with even where a later version of jaxnets chooses
    another default; resuming, those left undeclared come from the saved run's config. RunError as the options'
    own checks."""
    if saved is not None:
        config = dataclasses.replace(
            config, **{name: getattr(saved, name) for name in DATA_DEFAULTS if getattr(config, name) is None}
        )
    weights, axes = target_weights(config, dataset), angle_axes(config, dataset)
    return dataclasses.replace(
        config,
        loss=config.loss or default_loss(dataset),
        lr=default_lr(dataset) if config.lr is None else config.lr,
        dropout=dropout(config, dataset),
        target_weights=tuple(f"{name}:{weight!r}" for name, weight in weights.items()),
        angle_axes=tuple(f"{angle}:{minor}/{major}" for angle, (minor, major) in axes.items()),
        amplitudes=config.amplitudes or "plain",
        pixel_scale=config.pixel_scale or default_pixel_scale(dataset),
        refit_head=refit_head(config, dataset),
    )


def refit_head(config: Config, dataset: data_lib.Dataset) -> bool:
    """--refit-head, by default on for regression on CosmoSim data; RunError when asked for classification."""
    if config.refit_head is None:
        return dataset.task == "regression" and _is_cosmosim(dataset)
    if config.refit_head and dataset.task != "regression":
        raise RunError(f"--refit-head applies to regression; dataset {dataset.name!r} is {dataset.task}")
    return config.refit_head


def target_symmetry(dataset: data_lib.Dataset) -> TargetSymmetry:
    """How the square's rotations and mirrors move the targets (jaxnets.data.symmetry) of CosmoSim regression data;
    ValueError saying why for other data or targets without such a rule."""
    if dataset.task != "regression" or not _is_cosmosim(dataset):
        raise ValueError(f"rotations and mirrors apply to regression on CosmoSim data; {dataset.name!r} is not")
    height, width, _ = dataset.image_shape
    if height != width:
        raise ValueError(f"rotations apply to square images; {dataset.name!r} has {height} x {width} px")
    return TargetSymmetry.for_targets(dataset.target_names, dataset.angles)


def has_symmetry(dataset: data_lib.Dataset) -> bool:
    """Whether target_symmetry has a rule for the dataset: what evaluate.py's --tta defaults to."""
    try:
        target_symmetry(dataset)
    except ValueError:
        return False
    return True


def regression_outputs(
    dataset: data_lib.Dataset,
    encoding: TargetEncoding,
    symmetry: TargetSymmetry | None,
    views: list[np.ndarray],
    outputs: list[np.ndarray],
    true: np.ndarray,
) -> tuple[np.ndarray, dict]:
    """The encoded outputs [N, W] of the images in each of views averaged as evaluate.py does (one view, the images
    as they are, where symmetry is None), and the regression report of their decoded predictions against the raw
    targets true [N, P]."""
    averaged = outputs[0] if symmetry is None else symmetry.average_outputs(encoding, outputs, views)
    predictions = encoding.decode(averaged)
    return averaged, metrics.regression_report(true, predictions, dataset.target_names, periods=encoding.periods)


def _augment_rule(config: Config, dataset: data_lib.Dataset) -> TargetSymmetry | None:
    """--augment's rule for the targets, None without --augment; RunError when the data has none."""
    if not config.augment:
        return None
    try:
        return target_symmetry(dataset)
    except ValueError as error:
        raise RunError(f"--augment: {error}") from None


def output_names(dataset: data_lib.Dataset, config: Config | None = None) -> tuple[str, ...]:
    """The network's outputs: the classes, or one per regression target, two (cos, sin) per angle, and with
    --amplitudes polar three per amplitude pair (config None: the defaults)."""
    if dataset.task == "classification":
        return tuple(dataset.target_names)
    polar = polar_amplitudes(config, dataset) if config is not None else ()
    return dataset.target_encoding(standardize=False, polar=polar).encoded_names


def num_outputs(dataset: data_lib.Dataset, config: Config | None = None) -> int:
    return len(output_names(dataset, config))


def build_model(config: Config, dataset: data_lib.Dataset) -> nnx.Module:
    """The network named by config.model, sized for dataset's images and outputs (see _from_torch for
    --init-from)."""
    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    height, width, channels = dataset.image_shape
    outputs = num_outputs(dataset, config)
    rngs = nnx.Rngs(config.seed)
    if config.model == "mlp":
        return MLP(height * width * channels, config.hidden, outputs, dtype=dtype, rngs=rngs)
    kwargs = dict(
        aux_logits=config.aux_logits, dropout=dropout(config, dataset), head_features=config.head_features, dtype=dtype
    )
    if config.init_from:
        return _from_torch(config, dataset, kwargs, rngs)
    return Inception3(outputs, in_channels=channels, **kwargs, rngs=rngs)


def dropout(config: Config, dataset: data_lib.Dataset) -> float:
    """--dropout, by default 0 for regression (it would add noise to the outputs being fitted) and torchvision's
    0.5 for classification."""
    if config.dropout is not None:
        return config.dropout
    return 0.5 if dataset.task == "classification" else 0.0


def _from_torch(config: Config, dataset: data_lib.Dataset, kwargs: dict, rngs: nnx.Rngs) -> Inception3:
    """--init-from: the whole network from a state_dict of the same shape, or (--fine-tune) its backbone."""
    channels, outputs = dataset.image_shape[2], num_outputs(dataset, config)
    try:
        state_dict = convert.load_torch_checkpoint(config.init_from)
        if config.fine_tune:
            return convert.inception3_for_fine_tuning(state_dict, outputs, in_channels=channels, rngs=rngs, **kwargs)
        file_channels = convert.state_dict_in_channels(state_dict)
        if file_channels is not None and file_channels != channels:
            raise ValueError(
                f"its first convolution takes {file_channels}-channel images; the dataset's have {channels}. "
                "Add --fine-tune to adapt it (and train a new head)"
            )
        model = convert.inception3_from_torch(state_dict, in_channels=channels, **kwargs, rngs=rngs)
    except (OSError, ValueError) as error:
        raise RunError(f"--init-from {config.init_from}: {error}") from None
    if model.num_outputs != outputs:
        raise RunError(
            f"--init-from {config.init_from} has {model.num_outputs} outputs; the dataset "
            f"needs {outputs} ({', '.join(output_names(dataset, config))}). Add --fine-tune to train a new head"
        )
    return model


# What a number-valued option must be: (field, test of its value, the requirement as the error states it)
_OPTION_RANGES = (
    ("epochs", lambda value: value >= 1, "at least 1"),
    ("lr", lambda value: value is None or (math.isfinite(value) and value > 0), "a positive number"),
    ("weight_decay", lambda value: math.isfinite(value) and value >= 0, "0 or more"),
    ("ema", lambda value: 0 <= value < 1, "0 (off) or a decay in (0, 1)"),
    ("dropout", lambda value: value is None or 0 <= value < 1, "a probability in [0, 1)"),
    ("freeze_backbone_epochs", lambda value: value >= 0, "0 or more"),
    ("hidden", lambda value: all(size >= 1 for size in value), "layer sizes of at least 1"),
    ("head_features", lambda value: all(size >= 1 for size in value), "layer sizes of at least 1"),
)


def check_options(config: Config) -> None:
    """Refuses option values and combinations that cannot work, before any data is read."""
    for name, test, requirement in _OPTION_RANGES:
        value = getattr(config, name)
        if not test(value):
            raise RunError(f"{_flag(name)} must be {requirement}; got {format_value(value)}")
    if (config.simulate or (config.dataset == "lens" and not config.data)) and config.num_validation < 1:
        # train.py keeps the checkpoint with the least validation loss: these datasets make that split from it.
        raise RunError(
            f"--num-validation must be at least 1: training picks its best checkpoint on the validation split; "
            f"got {config.num_validation}"
        )
    if config.init_from and config.model != "inception3":
        raise RunError(f"--init-from loads an Inception3; --model is {config.model}")
    if config.fine_tune and not config.init_from:
        raise RunError("--fine-tune needs --init-from (the state_dict whose backbone to fine-tune)")
    if config.freeze_backbone_epochs and not config.fine_tune:
        raise RunError("--freeze-backbone-epochs needs --fine-tune (a backbone loaded with --init-from)")


def is_head(path: tuple) -> bool:
    """Whether a parameter's pytree path is in Inception3's head (convert.HEAD_PREFIXES: fc, AuxLogits.fc)."""
    return ".".join(str(getattr(key, "key", key)) for key in path).startswith(convert.HEAD_PREFIXES)


WARMUP_FRACTION = 0.05  # --schedule warmup_cosine: the share of the steps over which the rate rises from 0


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (AdamW with --weight-decay) with the chosen learning-rate schedule; config.lr as resolved by
    `with_data_defaults`."""
    if config.lr is None:
        raise ValueError("build_optimizer needs config.lr: resolve the data defaults first (with_data_defaults)")
    total_steps = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(config.lr, total_steps)
    elif config.schedule == "warmup_cosine":
        warmup = max(1, round(WARMUP_FRACTION * total_steps))
        learning_rate = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total_steps, warmup + 1))
    else:
        learning_rate = config.lr
    if config.weight_decay > 0:
        tx = optax.adamw(learning_rate, weight_decay=config.weight_decay)
    else:
        tx = optax.adam(learning_rate)
    if config.schedule == "plateau":
        # torch's ReduceLROnPlateau(patience=5, factor=0.5), judged on each epoch's mean training loss.
        tx = optax.chain(
            tx, optax.contrib.reduce_on_plateau(factor=0.5, patience=5, accumulation_size=max(1, steps_per_epoch))
        )
    if config.freeze_backbone_epochs > 0:
        # The backbone's updates are zeroed for the first epochs (BatchNorm statistics still follow the data,
        # as in PyTorch with requires_grad=False in train mode); Adam's moments meanwhile warm up.
        frozen_steps = config.freeze_backbone_epochs * steps_per_epoch
        hold = optax.scale_by_schedule(lambda count: jnp.where(count < frozen_steps, 0.0, 1.0))
        backbone = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: not is_head(path), params)  # noqa: E731
        tx = optax.chain(tx, optax.masked(hold, backbone))
    if config.ema > 0:
        tx = optax.chain(tx, training.params_ema(config.ema))
    if config.on_nan == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return tx


# ---------------------------------------------------------------------------------------------
# Training


# Options each host of a multi-process run may set for itself: where it finds its files and how it reads them
HOST_LOCAL_OPTIONS = ("data_dir", "image_dir", "read_threads", "compilation_cache")
_MESSAGE_BYTES = 1000


@contextlib.contextmanager
def _starting_together(config: Config):
    """The start-up of a multi-process run (reading the data, building the model: no collective in it), ended by
    one exchange between the processes: if one failed, every other stops too, with RunError naming it, instead of
    waiting for it at their first collective; if their options differ (a Slurm script passing another --lr to one
    task), all stop naming the options, instead of training diverging copies of the model. One process: a
    no-op."""
    if jax.process_count() == 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as error:  # shared first, raised below
        failure = error
    message = np.zeros(_MESSAGE_BYTES, np.uint8)
    if failure is not None:
        text = (str(failure) or type(failure).__name__).encode()[: _MESSAGE_BYTES - 1]
        message[0], message[1 : 1 + len(text)] = 1, np.frombuffer(text, np.uint8)
    shared = _shared_options(config)
    options = np.array([zlib.crc32(json.dumps(value).encode()) for value in shared.values()], np.uint32)
    messages, all_options = (multihost_utils.process_allgather(a) for a in (message, options))
    if failure is not None:
        raise failure
    failed = next((process for process, note in enumerate(messages) if note[0]), None)
    if failed is not None:
        text = bytes(messages[failed][1:]).rstrip(b"\0").decode(errors="replace")
        raise RunError(f"process {failed} of this run failed to start, so this one stops too: {text}")
    differing = [name for name, column in zip(shared, all_options.T, strict=True) if len(set(column)) > 1]
    if differing:
        raise RunError(
            "the processes of this run were given different options: "
            + ", ".join(map(_flag, differing))
            + "; give every task the same command (only "
            + ", ".join(map(_flag, HOST_LOCAL_OPTIONS))
            + " may differ)"
        )


def _flag(name: str) -> str:
    """A Config field's command-line flag: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


def _shared_options(config: Config) -> dict[str, object]:
    """{name: value} of every option all processes of a run must share, in Config's order."""
    return {name: value for name, value in dataclasses.asdict(config).items() if name not in HOST_LOCAL_OPTIONS}


def _lock_workdir(workdir: str) -> WorkdirLock | None:
    """The workdir's lock, taken by the run's first process (a multi-process run shares its workdir); every
    process of a second run on the same workdir is refused with RunError, before anything is written."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusy as error:
            refusal = str(error)
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)):
        refusal = refusal or f"workdir {workdir!r} is in use by another run (process 0 of this run was refused)"
    if refusal is not None:
        raise RunError(refusal)
    return lock


def _check_saved_config(config: Config, saved: Config, workdir: str) -> None:
    """Refuses to resume a run whose saved setup differs from the requested one (both with their data defaults
    written out)."""
    differences = saved.differences(config, Config.resume_fields())
    if differences:
        listed = "; ".join(
            f"{k}: saved {format_value(a)}, requested {format_value(b)}" for k, (a, b) in differences.items()
        )
        raise RunError(
            f"workdir {workdir!r} holds a run with a different setup ({listed}). Use another "
            f"--workdir for a fresh run, or the saved options to resume this one."
        )


def _lower_train_step(
    config: Config, loss_fn: training.LossFn, steps_per_epoch: int, state: training.TrainState, batch
) -> Callable[[], Callable]:
    """Traces the train step for the state's shapes and a real batch, or reads its trace from the step cache
    (`jaxnets.step_cache`, beside XLA's compilation cache): a wrong image size or channel count fails here, with the
    model's message and before anything is written. Returns `compile()`, which gives the step later."""
    cache = StepCache(config.compilation_cache) if config.compilation_cache and jax.process_count() == 1 else None
    try:
        with host_memory.collector_paused():
            shaped_by = None if cache is None else _step_shaped_by(config, steps_per_epoch)
            return training.lower_train_step(loss_fn, state, batch, cache, shaped_by)
    except ValueError as error:
        raise RunError(
            f"the {type(state.model()).__name__} model cannot take this dataset's images "
            f"{tuple(batch['image'].shape[1:])}: {error}"
        ) from None


# Options that cannot change the train step's program: where files are and how they are read (the pixel scale is a
# table the host applies), and the seeds (the initial weights and the data order are arrays, not constants of the
# program). Every other option is in its key.
STEP_INDEPENDENT_OPTIONS = HOST_LOCAL_OPTIONS + (
    "workdir",
    "seed",
    "data_seed",
    "num_validation",
    "num_test",
    "pixel_scale",
)


def _step_shaped_by(config: Config, steps_per_epoch: int) -> dict:
    """What built the train step besides its inputs, for the step cache's key: the run's options as resolved for its
    data, and the steps per epoch its learning-rate schedule counts."""
    options = dataclasses.asdict(config)
    for name in STEP_INDEPENDENT_OPTIONS:
        del options[name]
    return {"options": options, "steps_per_epoch": steps_per_epoch}


def _has_checkpoint(workdir: str) -> bool:
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return False
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.latest_step() is not None
    finally:
        checkpointer.close()


def _saved_config(workdir: str) -> Config | None:
    """The config.json of the run the workdir holds: None for a fresh workdir (no checkpoint), RunError where it
    has checkpoints but no readable config.json."""
    if not _has_checkpoint(workdir):
        return None
    try:
        return Config.load(workdir)
    except FileNotFoundError:
        raise RunError(f"workdir {workdir!r} has checkpoints but no config.json: use another --workdir") from None
    except ValueError as error:
        raise RunError(str(error)) from None


def _resume(config: Config, checkpointer: Checkpointer, state: training.TrainState, checked: bool):
    """Where training starts: (state, epoch, batch, partial epoch sums, history), from the latest checkpoint
    if the workdir has one (its setup checked against config at start-up: `checked`), else from the beginning."""
    if checkpointer.latest_step() is None:
        return state, 1, 0, None, []
    if not checked:  # another run wrote its first checkpoint since this one started and found none
        raise RunError(f"workdir {config.run_dir!r} gained a checkpoint while this run started: run it again")
    try:
        state, record, damaged = checkpointer.restore_newest_intact(state)
    except ValueError as error:
        raise RunError(str(error)) from None
    for message in damaged:
        warnings.warn(message, stacklevel=2)
    for step in checkpointer.steps():
        if step > int(state.step):  # damaged: training will write these steps again
            checkpointer.delete(step)
    epoch, batch = record["epoch"] + 1, record["batch"]
    print(f"Resuming from {checkpointer.directory} step {int(state.step)}: epoch {epoch}, batch {batch}", flush=True)
    partial = None if record.get("partial") is None else jax.tree.map(jnp.asarray, record["partial"])
    return state, epoch, batch, partial, monitor.read_history(config.run_dir, record["epoch"])


def _save_interrupted(checkpointer: Checkpointer, state: training.TrainState, record: dict, workdir: str) -> None:
    """Checkpoints a run stopped mid-epoch, with the data position and partial sums, and says how to resume."""
    checkpointer.save(state, record)
    checkpointer.wait()  # say "saved" only once it is
    print(
        f"Saved a checkpoint at step {int(state.step)} (epoch {record['epoch'] + 1}, batch {record['batch']}) "
        f"in {checkpointer.directory}. Resume with the same command:\n  python train.py --workdir {workdir} ...",
        file=sys.stderr,
        flush=True,
    )


def _diverged(summary: dict, epoch: int, checkpointer: Checkpointer, config: Config) -> RunError:
    return RunError(
        f"the loss became NaN or Inf at step {summary.get('first_nonfinite_step', '?')} in epoch "
        f"{epoch}; training stopped and the last good checkpoint in {checkpointer.directory} is "
        f"kept. Try a lower learning rate (--lr {config.lr / 10:g}) or --on-nan skip.",
        exit_code=3,
    )


def _refit_head(
    config: Config,
    dataset: data_lib.Dataset,
    encoding: TargetEncoding,
    checkpointer: Checkpointer,
    state: training.TrainState,
    mesh: jax.sharding.Mesh,
    stop: monitor.StopSignals,
    *,
    show: bool,
) -> None:
    """--refit-head: the head of the best checkpoint refitted on its features (`jaxnets.refit`: the last layer by
    least squares, a head with hidden layers also fine-tuned whole), saved beside the checkpoints for evaluate.py when
    it scores higher on validation than as trained."""
    checkpointer.wait()
    step = checkpointer.best_step()
    if step is None:
        warnings.warn("--refit-head: no checkpoint has a validation loss; the head stays as trained", stacklevel=2)
        return
    try:
        if read_refit(config.run_dir, step) is not None:
            print(f"The head of step {step} is already refitted (in {config.run_dir}); evaluate.py uses it", flush=True)
            return
    except ValueError as error:
        warnings.warn(f"{error}; refitting it again", stacklevel=2)
    started = time.perf_counter()
    # The state in memory when it is the best (the last epoch's, or what a finished run resumed): no read from disk.
    best = state if int(state.step) == step else checkpointer.restore(state, step)[0]
    views = SYMMETRIES if has_symmetry(dataset) else SYMMETRIES[:1]  # as evaluate.py reads the images
    symmetry = target_symmetry(dataset) if len(views) > 1 else None

    def r2_mean(outputs: list[np.ndarray], true: np.ndarray) -> float:
        _, summary = regression_outputs(dataset, encoding, symmetry, views, outputs, true)
        return float(np.nanmean([parameter["r2"] for parameter in summary["parameters"].values()]))

    def split(name: str, description: str):
        batches = pipeline.batches(
            dataset, name, config.batch_size, train=False, encoding=encoding, pixel_scale=config.pixel_scale
        )
        total = pipeline.num_batches(dataset, name, config.batch_size, train=False)
        return _refit_progress(batches, total, description, stop, show=show)

    with _epoch_progress(refit.HEAD_EPOCHS, "refit: the head fine-tuned", stop, show=show) as epochs:
        found = refit.refit_head(
            training.with_ema_params(best),
            split("train", "refit: training features"),
            split("validation", f"refit: validation in {len(views)} view(s)"),
            r2_mean,
            mesh,
            views=views,
            each_epoch=epochs,
        )
    elapsed = time.perf_counter() - started
    averaged = f", {len(views)} views averaged" if len(views) > 1 else ""
    if found.method is None:
        print(
            f"The head of step {step} stays as trained: no refit scored a higher validation R² mean "
            f"({found.trained_score:.4f}{averaged}), time = {elapsed:.1f} s",
            flush=True,
        )
        return
    record = {
        "step": int(step),
        "method": found.method,
        "ridge": found.ridge,
        "epochs": found.epochs,
        "layers": len(found.layers),
        "examples": found.examples,
        "views": len(views),
        "validation_r2_mean_as_trained": found.trained_score,
        "validation_r2_mean": found.score,
    }
    store = RefitCheckpointer(config.run_dir)
    try:
        store.save(step, found.layers, record)
    finally:
        store.close()
    print(
        f"Refitted the head of step {step} on {found.examples} training images: {report.describe_refit(record)}: "
        f"validation R² mean {found.trained_score:.4f} -> {found.score:.4f}{averaged}, time = {elapsed:.1f} s; "
        "evaluate.py uses it (--no-refit: as trained)",
        flush=True,
    )


def _refit_progress(batches, total: int, description: str, stop: monitor.StopSignals, *, show: bool):
    """batches under a progress bar (made when the first is read), until a signal arrives: then RunError with the
    signal's exit code (the checkpoints are intact)."""
    with tqdm(batches, description, total, leave=False, disable=not show) as bar:
        for batch in bar:
            _stop_the_refit(stop)
            yield batch


@contextlib.contextmanager
def _epoch_progress(total: int, description: str, stop: monitor.StopSignals, *, show: bool):
    """A callback for each epoch of the head's fine-tuning: a progress bar (made at the first epoch's end, after the
    features' bars), and RunError once a signal arrives."""
    bars = []

    def each_epoch(epoch: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=description, leave=False, disable=not show))
        bars[0].update(1)
        _stop_the_refit(stop)

    try:
        yield each_epoch
    finally:
        for bar in bars:
            bar.close()


def _stop_the_refit(stop: monitor.StopSignals) -> None:
    if stop.received is not None:
        raise RunError(
            "stopped during the refit of the head; the checkpoints are intact (evaluate.py evaluates the head as "
            "trained): run the same command again to refit",
            exit_code=stop.exit_code,
        )


def train_and_evaluate(config: Config) -> dict:
    """Trains config's model on its dataset; resumes from the workdir's latest checkpoint if any.

    Returns {"history": per-epoch metrics, "interrupted": the exit code of a received signal, or None}.
    Raises RunError for problems the user can fix.
    """
    check_options(config)
    setup_jax(config)
    workdir = config.run_dir
    with _starting_together(config):  # a multi-process run: all go on, or all stop with the reason
        dataset = load_data(config)
        saved = _saved_config(workdir)
        config = with_data_defaults(config, dataset, saved)
        if saved is not None:  # resuming: a run saved before the data defaults were written out left some None
            _check_saved_config(config, with_data_defaults(saved, dataset), workdir)
        loss_fn = loss_function(config, dataset)
        mesh = training.data_mesh()
        if config.batch_size % mesh.size:
            raise RunError(f"--batch-size {config.batch_size} must be a multiple of the {mesh.size} devices")
        steps_per_epoch = pipeline.num_batches(dataset, "train", config.batch_size, train=True)
        pipeline.num_batches(dataset, "validation", config.batch_size, train=False)  # fails now, not after epoch 1
        weights, axes = target_weights(config, dataset), angle_axes(config, dataset)
        encoding = None
        if dataset.task == "regression":
            encoding = dataset.target_encoding(
                standardize=config.standardize,
                weights=weights,
                axis_ratios=axes,
                polar=polar_amplitudes(config, dataset),
            )

        if config.init_from and saved is not None:
            # resuming: the checkpoint has the weights
            config_for_model = dataclasses.replace(config, init_from=None)
        else:
            config_for_model = config
        tx = optax.with_extra_args_support(build_optimizer(config, steps_per_epoch))  # one object: the same tree

        def new_state() -> training.TrainState:
            return training.TrainState.create(build_model(config_for_model, dataset), tx)

        # The train step compiles for the state's shapes, and the weights are made after it: the compiler's memory
        # and the state's never count towards the peak together (docs/cpu_performance.md, "Peak memory").
        state_shapes = training.replicated_shapes(new_state, mesh)
        eval_step = training.make_eval_step(loss_fn)
        train_batches = functools.partial(
            pipeline.batches,
            dataset,
            "train",
            config.batch_size,
            train=True,
            seed=config.seed,
            encoding=encoding,
            augment=_augment_rule(config, dataset),
            read_threads=config.read_threads,
            pixel_scale=config.pixel_scale,
        )
        validation_batches = functools.partial(
            pipeline.batches,
            dataset,
            "validation",
            config.batch_size,
            train=False,
            encoding=encoding,
            pixel_scale=config.pixel_scale,
        )
        example = next(iter(train_batches()))
    compile_train_step = _lower_train_step(
        config, loss_fn, steps_per_epoch, state_shapes, training.shard_batch(example, mesh)
    )
    # Everything is checked: only now is anything written to the workdir, by one run at a time.
    is_main = jax.process_index() == 0
    lock, checkpointer, writer = _lock_workdir(workdir), None, None
    with monitor.StopSignals() as stop:
        try:
            checkpointer = Checkpointer(workdir)
            # Compile before the weights exist and give the compiler's freed memory back, so that neither the state
            # nor the step's buffers count towards the peak memory together with it. The collector paused, as for
            # the trace: loading the program from XLA's cache allocates enough to start full collections over
            # everything alive.
            with host_memory.collector_paused():
                train_step = compile_train_step()
            host_memory.release_freed_memory()
            state, first_epoch, start_batch, totals, history = _resume(
                config, checkpointer, new_state(), checked=saved is not None
            )
            if is_main:
                config.save(workdir)
            writer = monitor.MetricWriter(workdir, history, enabled=is_main)
            state = training.replicate(state, mesh)
            record_base = {"targets": None if encoding is None else encoding.to_json()}
            data_wait = monitor.DataWait(config.read_threads)
            for epoch in range(first_epoch, config.epochs + 1):
                started = time.perf_counter()
                progress = monitor.Progress(config, epoch, start_batch, steps_per_epoch, stop, show=is_main)
                batches = data_wait.wrap(train_batches(epoch=epoch, start_batch=start_batch))
                state, totals, finished = training.train_epoch(
                    state, batches, train_step, mesh, totals=totals, on_step=progress
                )
                progress.close()
                data_wait.check(epoch, time.perf_counter() - started)
                summary = training.summarize(totals)
                if summary["nonfinite"] and config.on_nan == "stop":
                    raise _diverged(summary, epoch, checkpointer, config)
                if not finished:
                    partial = jax.tree.map(lambda x: x.item(), jax.device_get(totals))
                    record = dict(record_base, epoch=epoch - 1, batch=progress.batch, partial=partial)
                    _save_interrupted(checkpointer, state, record, workdir)
                    return {"history": writer.history, "interrupted": stop.exit_code}
                validation = training.evaluate(training.with_ema_params(state), validation_batches(), eval_step, mesh)
                elapsed = time.perf_counter() - started
                print(
                    f"Epoch {epoch}: Loss = {summary['loss']:.6g}, Validation loss = {validation['loss']:.6g}, "
                    f"time = {elapsed:.1f} s",
                    flush=True,
                )
                checkpointer.save(state, dict(record_base, epoch=epoch, batch=0, partial=None), validation["loss"])
                writer.write(
                    {
                        "epoch": epoch,
                        "step": int(state.step),
                        "loss": summary["loss"],
                        "validation_loss": validation["loss"],
                        "skipped_steps": summary["nonfinite"],
                        "seconds": round(elapsed, 2),
                    }
                )
                start_batch, totals = 0, None
                if stop.received is not None:
                    print(f"Stopped after epoch {epoch}; resume with the same command.", file=sys.stderr)
                    return {"history": writer.history, "interrupted": stop.exit_code}
            if config.refit_head:
                _refit_head(config, dataset, encoding, checkpointer, state, mesh, stop, show=is_main)
        finally:
            # Every way out (finished, interrupted, diverged, refused) waits for the async save and flushes the
            # events, still under StopSignals, so a second Ctrl-C during the wait exits at once.
            for resource in (checkpointer, writer, lock):
                if resource is not None:
                    resource.close()
    if is_main and writer.history:
        report.plot_loss_curve(os.path.join(workdir, "loss_curve.png"), writer.history)
    return {"history": writer.history, "interrupted": None}
