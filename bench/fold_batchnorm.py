"""BatchNorm folded into the convolutions once, outside the eval step (the performance issue's lever 2).

In eval mode every BasicConv2d computes relu(gamma * (conv(x, W) - mu) / sqrt(var + eps) + beta), which is
relu(conv(x, W * a) + b) with a = gamma / sqrt(var + eps) and b = beta - a * mu. Folding inside the jitted step
rescales all the weights on every batch (measured 5 % slower, README); this folds them once, as evaluate.py could
after loading a checkpoint, and times the eval step of the folded model (convolution + bias + ReLU) against the
unfolded one (convolution + BatchNorm + ReLU), alternating, medians of --rounds. Prints the largest difference
between the two models' outputs beside the times.

    python bench/fold_batchnorm.py                     # eval b32 1x128x128, float32
    python bench/fold_batchnorm.py --batch 64 --size 299 --channels 3
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.models import Inception3, layers


def folded_copy(model: nnx.Module) -> nnx.Module:
    """A copy of `model` (eval mode) whose BasicConv2d kernels carry their BatchNorm's scale; the BatchNorm keeps
    only its shift (mean 0, scale 1, variance 1 - eps, so its own arithmetic is the identity plus the bias)."""
    model = nnx.clone(model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, layers.BasicConv2d):
            bn = node.bn
            a = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
            node.conv.kernel.set_value(node.conv.kernel[...] * a)
            bn.bias.set_value(bn.bias[...] - a * bn.mean[...])
            bn.scale.set_value(jnp.ones_like(a))
            bn.mean.set_value(jnp.zeros_like(a))
            bn.var.set_value(jnp.ones_like(a) - bn.epsilon)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="batches per timed block")
    args = parser.parse_args()

    model = Inception3(6, in_channels=args.channels, aux_logits=False, rngs=nnx.Rngs(0))
    # Running statistics away from 0 / 1, as after training.
    rng = np.random.default_rng(0)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, layers.BatchNorm2d):
            shape = node.mean[...].shape
            node.mean.set_value(jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32))
            node.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32))
            node.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32))
    model.eval()
    folded = folded_copy(model)

    unfolded_bn = layers.BatchNorm2d.__call__

    def shift_only(self, x):  # the folded BatchNorm: its bias alone
        return (x + self.bias.get_value()).astype(self.dtype)

    images = jnp.asarray(rng.random((args.batch, args.size, args.size, args.channels), np.float32))
    graphdef, state = nnx.split(model)
    folded_graphdef, folded_state = nnx.split(folded)
    steps = {}
    layers.BatchNorm2d.__call__ = unfolded_bn
    steps["unfolded"] = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
    layers.BatchNorm2d.__call__ = shift_only
    steps["folded"] = jax.jit(lambda s, x: nnx.merge(folded_graphdef, s)(x)).lower(folded_state, images).compile()
    layers.BatchNorm2d.__call__ = unfolded_bn
    states = {"unfolded": state, "folded": folded_state}

    outputs = {name: np.asarray(step(states[name], images)) for name, step in steps.items()}
    scale = float(np.abs(outputs["unfolded"]).max())
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                out = step(states[name], images)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - started) / args.steps)
    result = {
        "batch": args.batch,
        "size": args.size,
        "channels": args.channels,
        "max relative difference": float(np.abs(outputs["folded"] - outputs["unfolded"]).max()) / scale,
        **{f"{name} s/batch": round(statistics.median(t), 4) for name, t in times.items()},
        **{f"{name} all": [round(v, 4) for v in t] for name, t in times.items()},
    }
    result["speed-up"] = round(result["unfolded s/batch"] / result["folded s/batch"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
