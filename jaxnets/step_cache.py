"""The train step's traced program, kept on disk beside XLA's compilation cache.

Every process traces its train step anew (Inception3: 1.8 s), lowers it (0.55 s), and only then finds the compiled
program in XLA's persistent cache (1.5 s). `jax.export` serialises the lowered program: a later run whose step has
the same key reads it back in milliseconds, and XLA's cache still supplies the compiled program
(docs/cpu_performance.md, "The traced step kept on disk").

The key holds everything the traced program can depend on: jaxnets' own source, the versions of the libraries that
trace it, the devices, the structure of the inputs (the model's graph and static attributes included) and the shape,
dtype and sharding of each, the environment variables of jaxnets, JAX and XLA, the module constants of jaxnets as
they are when the key is made (a script may set `jaxnets.models.layers.BATCHNORM_MOMENTUM`), and what the caller names
as having shaped the step (train.py: its options). A file that cannot be read or written is a miss, with a warning:
the step is traced as it would be without the cache.
"""

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import export

FORMAT = 2  # raise when what a file holds, or how the key is made, changes
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
SUBDIRECTORY = "jaxnets-steps"
ENVIRONMENT = ("JAXNETS_", "XLA_", "JAX_")  # variables that can change a trace ($JAXNETS_CONV, $XLA_FLAGS, ...)
# Where the model, losses, optimiser and step are built: their module constants enter the key as they are at run time.
TRACED_MODULES = (
    "jaxnets.activations",
    "jaxnets.conv",
    "jaxnets.data.symmetry",
    "jaxnets.data.targets",
    "jaxnets.experiment",
    "jaxnets.losses",
    "jaxnets.models.inception",
    "jaxnets.models.layers",
    "jaxnets.models.mlp",
    "jaxnets.training",
)
# Modules with constants that only the host reads, outside the step (files, data loading, reports): left out of the
# key. Every module with UPPER_CASE constants is in one list or the other (tests/test_step_cache.py checks), so a new
# one has to be placed.
HOST_MODULES = (
    "jaxnets.checkpoint",
    "jaxnets.config",
    "jaxnets.convert",
    "jaxnets.data",
    "jaxnets.data.cosmosim",
    "jaxnets.data.lens",
    "jaxnets.data.pipeline",
    "jaxnets.data.simulate",
    "jaxnets.evaluation",
    "jaxnets.host_memory",
    "jaxnets.metrics",
    "jaxnets.models",
    "jaxnets.monitor",
    "jaxnets.refit",
    "jaxnets.step_cache",
    "jaxnets.workdir_lock",
)
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # function reprs in the static parts of a tree: the name stays


@functools.cache
def _source_digest() -> str:
    """sha256 of jaxnets' Python source: a changed model, loss or step is another program."""
    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(package):
        subfolders.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as file:
                digest.update(file.read() + b"\0")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """A module constant as JSON the same in every process: sets sorted (their order follows string hashing, which
    differs between processes), patterns and arrays by their content, anything else by its repr without addresses."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, set | frozenset):
        return sorted((_plain(item) for item in value), key=repr)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, np.ndarray):
        return value.tolist()
    return _ADDRESS.sub("", repr(value))


def _module_constants() -> dict[str, Any]:
    """The UPPER_CASE globals of the modules a train step is built from (TRACED_MODULES), those loaded: values the
    source digest cannot see when a script changes them at run time. A module not loaded holds its source's values
    (and importing it here would add its import to the compile's time)."""
    return {
        f"{name}.{constant}": _plain(value)
        for name in TRACED_MODULES
        if name in sys.modules
        for constant, value in sorted(vars(sys.modules[name]).items())
        if constant.isupper() and not constant.startswith("_")
    }


def _version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_key(inputs: Any, shaped_by: dict, compiler_options: dict | None = None) -> str:
    """The key of a step taking `inputs` (a pytree of arrays); shaped_by: JSON-able values that the step's
    construction closed over (options, sizes), as the caller knows them."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(inputs)
    described = {
        "format": FORMAT,
        "libraries": {library: _version(library) for library in LIBRARIES},
        "source": _source_digest(),
        "devices": [str(device) + device.device_kind for device in jax.devices()],
        "processes": jax.process_count(),
        "constants": _module_constants(),
        "environment": {name: value for name, value in os.environ.items() if name.startswith(ENVIRONMENT)},
        "x64": jax.config.jax_enable_x64,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "tree": _ADDRESS.sub("", str(treedef)),
        "leaves": [
            (jax.tree_util.keystr(path), str(leaf.dtype), tuple(leaf.shape), str(getattr(leaf, "sharding", None)))
            for path, leaf in leaves
        ],
        "shaped_by": shaped_by,
        "compiler_options": compiler_options,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


class StepCache:
    """Traced train steps under `directory` (XLA's compilation cache folder), one file per key."""

    def __init__(self, directory: str):
        self.directory = os.path.join(directory, SUBDIRECTORY)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.exported")

    def load(self, key: str) -> export.Exported | None:
        try:
            with open(self._path(key), "rb") as file:
                return export.deserialize(bytearray(file.read()))
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged or foreign file: trace instead
            warnings.warn(f"ignoring the traced train step in {self._path(key)}: {error}", stacklevel=2)
            return None

    def save(self, key: str, exported: export.Exported) -> None:
        """Writes atomically: a reader sees the whole file or none."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as file:
                file.write(exported.serialize())
            os.replace(file.name, self._path(key))
        except Exception as error:  # a full or read-only disk costs the next run its trace, nothing more
            warnings.warn(f"could not keep the traced train step in {self.directory}: {error}", stacklevel=2)


def export_step(step: Callable, state: Any, batch: Any) -> export.Exported:
    """Traces and lowers `step(state, batch) -> (state, metrics)` for these inputs, as a program on the state's
    leaves: `export` serialises standard containers only, and the caller holds the state's structure."""
    state_def = jax.tree.structure(state)

    def on_leaves(state_leaves, batch):
        new_state, metrics = step(jax.tree.unflatten(state_def, state_leaves), batch)
        return jax.tree.leaves(new_state), metrics

    return export.export(jax.jit(on_leaves))(jax.tree.leaves(state), batch)


def lower_exported(
    exported: export.Exported, state: Any, batch: Any, *, donate: bool = True, compiler_options: dict | None = None
) -> jax.stages.Lowered:
    """The exported step lowered for these inputs, the state's leaves donated (as `make_train_step` does)."""
    call = jax.jit(exported.call, donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
    return call.lower(jax.tree.leaves(state), batch)


def on_trees(compiled: Callable, state: Any) -> Callable:
    """`step(state, batch) -> (state, metrics)` around a compiled exported step, which takes the state's leaves."""
    state_def = jax.tree.structure(state)

    def step(state, batch):
        leaves, metrics = compiled(jax.tree.leaves(state), batch)
        return jax.tree.unflatten(state_def, leaves), metrics

    return step


def lower_cached(
    step_function: Callable,
    state: Any,
    batch: Any,
    cache: StepCache,
    shaped_by: dict,
    *,
    donate: bool = True,
    compiler_options: dict | None = None,
) -> Callable[[], Callable]:
    """`step_function(state, batch) -> (state, metrics)` traced and lowered for these inputs, or its trace read back
    from the cache under the same key; returns `compile()`, which gives the step (on the state as a tree).

    Both ways compile the same program, so XLA's persistent cache serves the second run either way."""
    key = step_key((state, batch), shaped_by, compiler_options)
    exported = cache.load(key)
    if exported is None:
        exported = export_step(step_function, state, batch)
        cache.save(key, exported)
    lowered = lower_exported(exported, state, batch, donate=donate, compiler_options=compiler_options)
    return lambda: on_trees(lowered.compile(), state)
