"""The stride-1 convolutions' input gradient on CPU: col2im against the flipped kernel (the performance issue's
lever 3, less copying around the products). Tried 2026-12-02 and not kept (README, "Why the code is as it is").

`jaxnets.conv`'s im2col backward computes d columns = d output @ kernelᵀ in float32 ([batch, H, W, kh·kw·in]) and
adds each window's share back onto the image (col2im). For a stride-1 layer the same gradient is the forward's
im2col of the output gradient (padded by kernel − 1 − padding) times the kernel flipped in both axes with its
channel axes swapped: no float32 columns, no col2im. Both variants of `training.make_train_step` are compiled in
one process (the flipped one with Inception3's convolution swapped for `conv2d_flipped` while it is traced) and
timed alternately, medians of --rounds.

    python bench/input_gradient.py --precision bf16        # b32 1x128x128, Adam, MSE
"""

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from remat import random_batch, time_alternately  # bench/, the script's folder

from jaxnets import conv, host_memory, losses, training
from jaxnets.models import Inception3
from jaxnets.models import layers as model_layers

VARIANTS = ("col2im", "flipped")


def conv2d_flipped(images, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), *, precision=None, **_):
    """jaxnets.conv.conv2d's im2col + dot, with the flipped-kernel input gradient where the layer allows it."""
    dtype = jnp.result_type(images, kernel)
    padding = tuple(tuple(int(pad) for pad in pair) for pair in padding)
    return _conv_flipped(images.astype(dtype), kernel.astype(dtype), tuple(map(int, strides)), padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_flipped(images, kernel, strides, padding, precision):
    return conv._conv_dot(images, kernel, strides, padding, precision)


def _conv_flipped_forward(images, kernel, strides, padding, precision):
    return _conv_flipped(images, kernel, strides, padding, precision), (images, kernel)


def _conv_flipped_backward(strides, padding, precision, residuals, output_grad):
    images, kernel = residuals
    # jaxnets' own backward; its col2im image gradient is left unused (and removed by XLA) where replaced below.
    images_grad, kernel_grad = conv._conv_dot_backward(strides, padding, precision, residuals, output_grad)
    kernel_h, kernel_w, in_channels, out_channels = kernel.shape
    (top, bottom), (left, right) = padding
    full = ((kernel_h - 1 - top, kernel_h - 1 - bottom), (kernel_w - 1 - left, kernel_w - 1 - right))
    if strides == (1, 1) and (kernel_h, kernel_w) != (1, 1) and min(min(pair) for pair in full) >= 0:
        columns = conv.patches(output_grad.astype(images.dtype), (kernel_h, kernel_w), (1, 1), full)
        flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2).reshape(kernel_h * kernel_w * out_channels, in_channels)
        images_grad = conv._matmul(columns, flipped, (3,), (0,), precision, images.dtype)
    return images_grad, kernel_grad


_conv_flipped.defvjp(_conv_flipped_forward, _conv_flipped_backward)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=("f32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    args = parser.parse_args()

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = Inception3(6, in_channels=1, aux_logits=False, dtype=dtype, rngs=nnx.Rngs(0))
    batch = random_batch(args.batch, args.size)
    base = training.TrainState.create(model, optax.adam(1e-3))
    states, compiled = {}, {}
    result = {"precision": args.precision, "batch": args.batch, "size": args.size, "cpu": cpu_name()}
    original = model_layers.conv2d
    for name in VARIANTS:
        states[name] = jax.tree.map(jnp.copy, base)  # each its own buffers: the steps donate them
        model_layers.conv2d = conv2d_flipped if name == "flipped" else original  # Conv2d calls this name
        try:
            compiled[name] = training.make_train_step(losses.mse).lower(states[name], batch).compile()
        finally:
            model_layers.conv2d = original
        result[f"{name}: temp MiB"] = round(compiled[name].memory_analysis().temp_size_in_bytes / 2**20, 1)
    for name in VARIANTS:  # warm-up
        states[name], _ = compiled[name](states[name], batch)
    times = time_alternately(compiled, states, batch, args.rounds, args.steps)
    for name in VARIANTS:
        result[f"{name}: s/step"] = round(statistics.median(times[name]), 4)
        result[f"{name}: rounds"] = [round(t, 3) for t in times[name]]
    result["time ratio flipped / col2im"] = round(result["flipped: s/step"] / result["col2im: s/step"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # as train.py does: faster steps on CPU
    main()
