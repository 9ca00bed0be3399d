"""lax.conv_general_dilated against jaxnets.conv's im2col + dot, on every convolution shape of Inception3.

The two alternate call by call (the machine is shared and noisy: compare ratios, not absolute rates); medians of
--repeats calls; forward alone and forward + backward (output, input gradient, kernel gradient: 3x the FLOPs).
Prints GFLOP/s per shape class, FLOP-weighted over the model's layers (a class's FLOPs / its time), then one
JSON line. The shapes are collected by running Inception3 itself, so they are exactly the model's.

    python bench/conv_shapes.py                      # batch 32, 1x128x128 and batch 16, 3x299x299
    python bench/conv_shapes.py --sizes 32x128x1 --dtypes bfloat16 --per-shape
"""

import argparse
import collections
import functools
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets import conv as jaxnets_conv
from jaxnets.models import Inception3
from jaxnets.models import layers as model_layers

Shape = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]


def inception_conv_shapes(batch: int, size: int, channels: int) -> collections.Counter:
    """{(images shape, kernel shape, strides, padding): number of layers} of Inception3 (eval mode, no aux head)."""
    seen: collections.Counter = collections.Counter()
    original = jaxnets_conv.conv2d

    def record(images, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), **kwargs):
        key = (tuple(images.shape), tuple(kernel.shape), tuple(strides), tuple(map(tuple, padding)))
        seen[key] += 1
        return original(images, kernel, strides, padding, **kwargs)

    model = Inception3(4, in_channels=channels, rngs=nnx.Rngs(0))
    model.eval()
    model_layers.conv2d = record  # Conv2d calls the name it imported from jaxnets.conv
    try:
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32))
    finally:
        model_layers.conv2d = original
    if not seen:
        raise RuntimeError("no convolution recorded: Inception3 no longer calls jaxnets.models.layers.conv2d")
    return seen


def shape_class(shape: Shape) -> str:
    _, (kernel_h, kernel_w, _, _), strides, _ = shape
    name = f"{kernel_h}x{kernel_w}"
    if kernel_h != kernel_w:
        name = "1x7/7x1" if 7 in (kernel_h, kernel_w) else "1x3/3x1"
    return name + (" stride 2" if strides != (1, 1) else "")


def flops(shape: Shape) -> int:
    """Multiply-adds x 2 of one forward convolution."""
    (batch, height, width, _), (kernel_h, kernel_w, in_channels, out_channels), strides, padding = shape
    out_h = (height + sum(padding[0]) - kernel_h) // strides[0] + 1
    out_w = (width + sum(padding[1]) - kernel_w) // strides[1] + 1
    return 2 * batch * out_h * out_w * kernel_h * kernel_w * in_channels * out_channels


def make_functions(shape: Shape, implementation: str) -> dict[str, Callable]:
    _, _, strides, padding = shape
    conv = lambda x, w: jaxnets_conv.conv2d(x, w, strides, padding, implementation=implementation)

    def forward_backward(x, w, output_grad):
        output, vjp = jax.vjp(conv, x, w)
        return (output, *vjp(output_grad))

    return {"fwd": jax.jit(lambda x, w, g: conv(x, w)), "fwd+bwd": jax.jit(forward_backward)}


def time_alternating(functions: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn after one warm-up (compile) call each."""
    for function in functions.values():
        jax.block_until_ready(function(*args))
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(function(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["32x128x1", "16x299x3"], help="BATCHxSIZExCHANNELS")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-shape", action="store_true", help="also print one row per layer shape")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    results = []
    for size_spec in args.sizes:
        batch, size, channels = map(int, size_spec.split("x"))
        shapes = inception_conv_shapes(batch, size, channels)
        for dtype_name in args.dtypes:
            dtype = jnp.dtype(dtype_name)
            # seconds[class][mode][implementation], weighted by the number of layers of each shape
            seconds = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.Counter()))
            class_flops = collections.Counter()
            for shape, layers in shapes.items():
                images_shape, kernel_shape, strides, padding = shape
                images = jnp.asarray(rng.standard_normal(images_shape), dtype)
                kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.1, dtype)
                output = jax.eval_shape(
                    functools.partial(jaxnets_conv.conv2d, strides=strides, padding=padding), images, kernel
                )
                output_grad = jnp.asarray(rng.standard_normal(output.shape), dtype)
                per_implementation = {impl: make_functions(shape, impl) for impl in ("lax", "dot")}
                row = []
                for mode in ("fwd", "fwd+bwd"):
                    timed = time_alternating(
                        {impl: functions[mode] for impl, functions in per_implementation.items()},
                        (images, kernel, output_grad),
                        args.repeats,
                    )
                    work = flops(shape) * (3 if mode == "fwd+bwd" else 1)
                    for impl, t in timed.items():
                        seconds[shape_class(shape)][mode][impl] += t * layers
                    row.append(f"{mode} lax {work / timed['lax'] / 1e9:5.0f} dot {work / timed['dot'] / 1e9:5.0f}")
                class_flops[shape_class(shape)] += flops(shape) * layers
                if args.per_shape:
                    print(
                        f"{size_spec} {dtype_name} {layers:2d}x {images_shape} {kernel_shape} s{strides[0]} "
                        f"p{padding[0][0]}{padding[1][0]}: " + " | ".join(row),
                        flush=True,
                    )
            for name in [*sorted(class_flops), "all"]:
                names = list(class_flops) if name == "all" else [name]
                work = sum(class_flops[n] for n in names)
                entry = {"size": size_spec, "dtype": dtype_name, "class": name, "gflop_fwd": round(work / 1e9, 2)}
                for mode, factor in (("fwd", 1), ("fwd+bwd", 3)):
                    for impl in ("lax", "dot"):
                        total = sum(seconds[n][mode][impl] for n in names)
                        entry[f"{mode} {impl}"] = round(work * factor / total / 1e9, 1)
                        entry[f"{mode} {impl} ms"] = round(total * 1e3, 1)
                results.append(entry)

    header = (
        f"{'size':10s} {'dtype':9s} {'class':16s} {'GFLOP':>6s} "
        "| GFLOP/s  fwd: lax   dot  ratio | fwd+bwd: lax   dot  ratio"
    )
    print(header)
    print("-" * len(header))
    for e in results:
        print(
            f"{e['size']:10s} {e['dtype']:9s} {e['class']:16s} {e['gflop_fwd']:6.2f} |"
            f"            {e['fwd lax']:5.0f} {e['fwd dot']:5.0f} {e['fwd dot'] / e['fwd lax']:5.2f}x |"
            f"         {e['fwd+bwd lax']:5.0f} {e['fwd+bwd dot']:5.0f} {e['fwd+bwd dot'] / e['fwd+bwd lax']:5.2f}x"
        )
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "results": results}))


if __name__ == "__main__":
    main()
