"""bench/profile_step.py: each XLA kernel attributed to what it does, through the program's source locations."""

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets.conv import COMPILER_OPTIONS, conv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))  # as when the script runs: its folder first
spec = importlib.util.spec_from_file_location("profile_step", os.path.join(ROOT, "bench", "profile_step.py"))
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's im2col kernels")
def test_kernels_are_attributed_to_the_convolution_and_adam():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((4, 12, 12, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) / 8, jnp.float32)
    adam = optax.adam(1e-3)

    def step(kernel, opt_state, images):
        def loss(kernel):
            hidden = conv2d(images, kernel, padding=((1, 1), (1, 1)), implementation="dot")
            return jnp.sum(jax.nn.relu(hidden) ** 2)

        updates, opt_state = adam.update(jax.grad(loss)(kernel), opt_state)
        return optax.apply_updates(kernel, updates), opt_state

    program = jax.jit(step, compiler_options=COMPILER_OPTIONS).lower(kernel, adam.init(kernel), images).compile()
    sources = profile_step.kernel_sources(program.as_text())
    kinds = {profile_step.category(name, sources) for name in sources}
    assert "matrix products" in kinds
    assert "im2col: the columns and their zero padding" in kinds
    assert "Adam update" in kinds
    assert profile_step.category("no_such_kernel.3", sources) == "other (no_such_kernel)"


def test_loops_and_calls_are_not_counted_beside_the_kernels_they_run():
    event = lambda name, ns: types.SimpleNamespace(name=name, duration_ns=ns)  # noqa: E731
    xla_thread = types.SimpleNamespace(
        name="XLAEigen",
        events=[event("while.73", 900), event("dot.4", 500), event("fusion.2", 300), event("call", 800)],
    )
    planes = [
        types.SimpleNamespace(name="/host:CPU", lines=[xla_thread, types.SimpleNamespace(name="python", events=[])]),
        types.SimpleNamespace(name="/device:GPU:0", lines=[xla_thread]),
    ]
    assert list(profile_step.kernel_runs(planes)) == [("dot.4", 500), ("fusion.2", 300)]
