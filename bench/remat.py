"""Rematerialisation in Inception3's train step: memory saved against time lost (the performance issue's lever 4).

Three variants of `training.make_train_step`, compiled in one process: as it is; the model's call under
`nnx.remat` (jax.checkpoint) with only the convolutions' outputs saved (BatchNorm and ReLU recomputed in the
backward pass); and with nothing saved (`nothing_saveable`, the lower bound). Memory is XLA's buffer assignment
(`compiled.memory_analysis()`, deterministic); time is per step, the variants alternating, medians of --rounds.

    python bench/remat.py --precision f32        # b32 1x128x128, Adam, MSE
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxnets import losses, training
from jaxnets.models import Inception3, layers

CONV_OUTPUT = "conv_output"


def random_batch(batch: int, size: int, channels: int = 1, outputs: int = 6) -> dict:
    """A batch of the train step's shape, the same draws every time: uniform images, normal targets, every row
    counted."""
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.random((batch, size, size, channels), np.float32)),
        "target": jnp.asarray(rng.normal(size=(batch, outputs)).astype(np.float32)),
        "mask": jnp.ones(batch, jnp.float32),
    }


def time_alternately(compiled: dict, states: dict, batch: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each compiled train step, {name: one figure per round}: each round runs `steps` steps of
    every variant in turn (the machine's noise falls on all of them), each from and into states[name]."""
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, step in compiled.items():
            started = time.perf_counter()
            for _ in range(steps):
                states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - started) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    args = parser.parse_args()

    # Name every convolution's output so a policy can keep exactly those.
    call = layers.Conv2d.__call__
    layers.Conv2d.__call__ = lambda self, x: checkpoint_name(call(self, x), CONV_OUTPUT)

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = Inception3(6, in_channels=1, aux_logits=False, dtype=dtype, rngs=nnx.Rngs(0))
    batch = random_batch(args.batch, args.size)
    variants = {
        "as is": None,
        "save convolution outputs": jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
        "save nothing": jax.checkpoint_policies.nothing_saveable,
    }
    base = training.TrainState.create(model, optax.adam(1e-3))
    states, compiled, result = {}, {}, {"precision": args.precision, "batch": args.batch, "size": args.size}
    model_call = Inception3.__call__
    for name, policy in variants.items():
        # The step is traced at lower(): the model's call is swapped for that moment only.
        Inception3.__call__ = model_call if policy is None else nnx.remat(model_call, policy=policy)
        states[name] = jax.tree.map(jnp.copy, base)  # each its own buffers: the steps donate them
        compiled[name] = training.make_train_step(losses.mse).lower(states[name], batch).compile()
        Inception3.__call__ = model_call
        memory = compiled[name].memory_analysis()
        result[f"{name}: temp MiB"] = round(memory.temp_size_in_bytes / 2**20, 1)
        states[name], metrics = compiled[name](states[name], batch)  # warm-up
        result[f"{name}: first loss"] = float(metrics["loss_sum"] / metrics["count"])
    times = time_alternately(compiled, states, batch, args.rounds, args.steps)
    for name in variants:
        result[f"{name}: s/step"] = round(statistics.median(times[name]), 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
