"""The traced train step kept on disk (jaxnets.step_cache): the same program as the jitted step, found again only
under the same key, and never in the way of a run."""

import importlib
import os
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import jaxnets
from conftest import tiny_config
from jaxnets import experiment, losses, step_cache, training
from jaxnets.models import MLP, layers


def mlp_state(hidden=(8,), lr=1e-2):
    return training.TrainState.create(MLP(16, hidden, 3, rngs=nnx.Rngs(0)), optax.adam(lr))


def a_batch(rows=4):
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.random((rows, 4, 4, 1), np.float32)),
        "target": jnp.asarray(rng.normal(size=(rows, 3)).astype(np.float32)),
        "mask": jnp.ones(rows, jnp.float32),
    }


def assert_same_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_exported_step_read_back_steps_exactly_as_the_jitted_step(tmp_path):
    state, batch = mlp_state(), a_batch()
    expected = training.make_train_step(losses.mse, donate=False)(state, batch)
    cache = step_cache.StepCache(str(tmp_path))
    cache.save("k", step_cache.export_step(training.train_step_function(losses.mse), state, batch))
    exported = cache.load("k")
    lowered = step_cache.lower_exported(exported, state, batch, donate=False)
    step = step_cache.on_trees(lowered.compile(), state)
    new_state, metrics = step(state, batch)
    assert isinstance(new_state, training.TrainState)
    assert_same_trees((new_state, metrics), expected)
    assert_same_trees(step(new_state, batch), training.make_train_step(losses.mse, donate=False)(*expected[:1], batch))


def test_the_key_names_the_inputs_and_what_shaped_the_step_not_where_objects_live():
    batch = a_batch()
    key = step_cache.step_key((mlp_state(), batch), {"lr": 0.01})
    assert key == step_cache.step_key((mlp_state(), batch), {"lr": 0.01})  # another model, other addresses
    others = [
        step_cache.step_key((mlp_state(), batch), {"lr": 0.02}),
        step_cache.step_key((mlp_state(hidden=(9,)), batch), {"lr": 0.01}),
        step_cache.step_key((mlp_state(), a_batch(rows=5)), {"lr": 0.01}),
        step_cache.step_key((mlp_state(), {**batch, "image": batch["image"].astype(jnp.bfloat16)}), {"lr": 0.01}),
        step_cache.step_key((mlp_state(), batch), {"lr": 0.01}, {"xla_disable_hlo_passes": "cse_barrier_expander"}),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_the_key_follows_jaxnets_source_and_the_variables_that_change_a_trace(monkeypatch):
    inputs = (mlp_state(), a_batch())
    key = step_cache.step_key(inputs, {})
    monkeypatch.setenv("JAXNETS_CONV", "lax")  # another convolution in the same model
    changed = step_cache.step_key(inputs, {})
    assert changed != key
    monkeypatch.setattr(step_cache, "_source_digest", lambda: "edited")
    assert step_cache.step_key(inputs, {}) not in {key, changed}


def test_the_key_follows_module_constants_changed_at_run_time(monkeypatch):
    """A script that sets a constant the step is built from gets its own program, not the one traced before."""
    inputs = (mlp_state(), a_batch())
    key = step_cache.step_key(inputs, {})
    monkeypatch.setattr(layers, "BATCHNORM_MOMENTUM", 0.99)
    momentum = step_cache.step_key(inputs, {})
    monkeypatch.setattr(training, "AUX_LOSS_WEIGHT", 0.3)
    assert len({key, momentum, step_cache.step_key(inputs, {})}) == 3
    monkeypatch.undo()
    assert step_cache.step_key(inputs, {}) == key


def test_every_module_with_constants_is_placed_in_or_out_of_the_key():
    """A new module whose constants shape the step would be left out of the key, and a script that changes one
    would get the program traced before: each module with UPPER_CASE constants is listed as traced or host-only."""
    modules = {"jaxnets"} | {module.name for module in pkgutil.walk_packages(jaxnets.__path__, "jaxnets.")}
    with_constants = {
        name
        for name in modules
        if any(constant.isupper() and not constant.startswith("_") for constant in vars(importlib.import_module(name)))
    }
    traced, host = set(step_cache.TRACED_MODULES), set(step_cache.HOST_MODULES)
    assert not traced & host
    assert with_constants - traced - host == set()
    assert traced | host <= modules  # no stale names


def test_the_key_is_the_same_in_another_process_with_other_string_hashes():
    """Sets among the constants (e.g. data.symmetry.INVARIANTS) iterate in an order set by string hashing, which
    Python seeds per process; a key that followed it would miss on every run."""
    script = (
        "import sys; sys.path.insert(0, 'tests'); "
        "from test_step_cache import mlp_state, a_batch; from jaxnets import step_cache; "
        "print(step_cache.step_key((mlp_state(), a_batch()), {'lr': 0.01}))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {step_cache.step_key((mlp_state(), a_batch()), {"lr": 0.01})}


def test_a_damaged_or_missing_file_is_a_miss_and_an_unwritable_folder_a_warning(tmp_path):
    cache = step_cache.StepCache(str(tmp_path))
    assert cache.load("absent") is None
    (tmp_path / step_cache.SUBDIRECTORY).mkdir()
    (tmp_path / step_cache.SUBDIRECTORY / "bad.exported").write_bytes(b"not a program")
    with pytest.warns(UserWarning, match="ignoring the traced train step"):
        assert cache.load("bad") is None
    (tmp_path / "file").write_text("")
    blocked = step_cache.StepCache(str(tmp_path / "file"))  # its folder cannot be made
    exported = step_cache.export_step(training.train_step_function(losses.mse), mlp_state(), a_batch())
    with pytest.warns(UserWarning, match="could not keep the traced train step"):
        blocked.save("k", exported)


def run_counting_traces(tmp_path, monkeypatch, name, **changes):
    """A tiny train.py run as a new process starts it (nothing compiled in memory); returns (history, traces)."""
    traces = []
    export_step = step_cache.export_step
    monkeypatch.setattr(step_cache, "export_step", lambda *args: traces.append(1) or export_step(*args))
    jax.clear_caches()
    compilation_cache.reset_cache()
    config = tiny_config(tmp_path, workdir=str(tmp_path / name), compilation_cache=str(tmp_path / "cache"), **changes)
    result = experiment.train_and_evaluate(config)
    return [(record["loss"], record["validation_loss"]) for record in result["history"]], len(traces)


def test_a_second_run_reads_its_traced_step_and_trains_the_same(tmp_path, monkeypatch):
    first, traced = run_counting_traces(tmp_path, monkeypatch, "first")
    assert traced == 1 and len(list((tmp_path / "cache" / step_cache.SUBDIRECTORY).iterdir())) == 1
    second, traced = run_counting_traces(tmp_path, monkeypatch, "second")
    assert traced == 0 and second == first
    # Another seed is other arrays, and another pixel scale other batches, not another program; another learning
    # rate is another program.
    _, traced = run_counting_traces(tmp_path, monkeypatch, "seed", seed=1)
    assert traced == 0
    log_pixels, traced = run_counting_traces(tmp_path, monkeypatch, "log", pixel_scale="log")
    assert traced == 0 and log_pixels != first
    other_lr, traced = run_counting_traces(tmp_path, monkeypatch, "lr", lr=TINY_LR / 2)
    assert traced == 1 and other_lr != first
    without_cache = experiment.train_and_evaluate(
        tiny_config(tmp_path, workdir=str(tmp_path / "plain"), compilation_cache="")
    )["history"]
    assert [(r["loss"], r["validation_loss"]) for r in without_cache] == first


TINY_LR = 1e-3
