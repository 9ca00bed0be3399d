"""Trains a tiny BatchNorm model a few steps and prints the losses as JSON (run in subprocesses).

Usage: python multidevice_worker.py single | devices | process <id> <port> [cached]
With `cached` the step is the traced step kept by jaxnets.step_cache: exported and saved, then read back.
"""

import json
import os
import sys

mode = sys.argv[1]
if mode == "devices":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if mode == "process":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
    )

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxnets import losses, step_cache, training  # noqa: E402


class Net(nnx.Module):
    # BatchNorm makes the loss depend on the whole global batch: a per-device mean would differ.
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(6, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.norm(self.linear1(x.reshape(x.shape[0], -1)))))


rng = np.random.default_rng(0)
batch = {
    "image": rng.normal(size=(16, 6)).astype(np.float32),
    "target": rng.normal(size=(16, 2)).astype(np.float32),
    "mask": np.ones(16, np.float32),
}
if mode == "process":
    rows = slice(8 * jax.process_index(), 8 * (jax.process_index() + 1))
    batch = {key: value[rows] for key, value in batch.items()}
mesh = training.data_mesh()
state = training.replicate(training.TrainState.create(Net(nnx.Rngs(0)), optax.adam(1e-2)), mesh)
step = training.make_train_step(losses.mse)
if sys.argv[-1] == "cached":
    import tempfile

    example = training.shard_batch(batch, mesh)
    with tempfile.TemporaryDirectory() as folder:
        for _ in ("saved", "read back"):
            compile_step = step_cache.lower_cached(
                training.train_step_function(losses.mse), state, example, step_cache.StepCache(folder), {}
            )
        assert len(os.listdir(os.path.join(folder, step_cache.SUBDIRECTORY))) == 1
    step = compile_step()
result = []
for _ in range(3):
    state, metrics = step(state, training.shard_batch(batch, mesh))
    result.append(training.summarize(metrics)["loss"])
kernel = np.asarray(jax.device_get(state.params["linear1"]["kernel"][...]))
print(json.dumps({"devices": jax.device_count(), "losses": result, "kernel_sum": float(kernel.sum())}))
