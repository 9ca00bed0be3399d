"""Winograd F(2x2, 3x3) against jaxnets.conv's im2col + dot, on Inception3's stride-1 3x3 convolutions.

The performance issue's first lever: a 3x3 convolution computed on 4x4 input tiles as 16 matrix products needs
2.25x fewer multiplications than im2col (16 instead of 36 per 2x2 output tile and channel pair). This is the
textbook algorithm (Lavin & Gray 2016) written in JAX: the input transform B^T d B and the output transform
A^T m A as slices and adds, the kernel transform G g G^T, 16 batched products summed in float32. Gradients:
autodiff through the transforms (linear), a custom rule for the products so that bfloat16 stays bfloat16 in them
(as jaxnets.conv does). Both implementations alternate call by call; medians of --repeats calls; forward alone
and forward + backward; the error against lax.conv_general_dilated in float64 is printed beside each.

    python bench/winograd.py                      # batch 32, 1x128x128, float32 and bfloat16
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from conv_shapes import inception_conv_shapes  # bench/ is on sys.path when run as a script

from jaxnets import conv as jaxnets_conv

jax.config.update("jax_enable_x64", True)  # the float64 reference only; the timed code is float32 / bfloat16

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A.
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def _input_transform(x: jax.Array, tiles_h: int, tiles_w: int) -> jax.Array:
    """x [N, 2 th + 2, 2 tw + 2, C] (padded) -> V [16, N * th * tw, C]: B^T d B of every 4x4 tile (stride 2)."""
    n, _, _, c = x.shape

    def phase(a, axis, i, count):  # rows (or columns) i, i + 2, ..., count of them
        start = [0, 0, 0, 0]
        start[axis] = i
        limit = list(a.shape)
        limit[axis] = i + 2 * (count - 1) + 1
        strides = [1, 1, 1, 1]
        strides[axis] = 2
        return jax.lax.slice(a, start, limit, strides)

    def transform(a, axis, count):  # B^T along one axis: d0 - d2, d1 + d2, d2 - d1, d1 - d3
        d = [phase(a, axis, i, count) for i in range(4)]
        return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]

    rows = transform(x, 1, tiles_h)
    v = [col for row in rows for col in transform(row, 2, tiles_w)]
    return jnp.stack(v).reshape(16, n * tiles_h * tiles_w, c)


def _output_transform(m: jax.Array, n: int, tiles_h: int, tiles_w: int) -> jax.Array:
    """M [16, N * th * tw, K] -> Y [N, 2 th, 2 tw, K]: A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    k = m.shape[-1]
    m = m.reshape(4, 4, n, tiles_h, tiles_w, k)
    s = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]  # over the tile's rows: [4 (columns), N, th, tw, K] each
    y = [[row[0] + row[1] + row[2], row[1] - row[2] - row[3]] for row in s]
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [N, th, 2, tw, 2, K]
    return y.reshape(n, 2 * tiles_h, 2 * tiles_w, k)


@jax.custom_vjp
def _products(v: jax.Array, u: jax.Array) -> jax.Array:
    """[16, P, C] @ [16, C, K] -> [16, P, K], 16-bit inputs summed in float32, in the inputs' dtype."""
    accumulate = jaxnets_conv._accumulation_dtype(v.dtype)
    out = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=accumulate)
    return out.astype(v.dtype)


def _products_forward(v, u):
    return _products(v, u), (v, u)


def _products_backward(residuals, grad):
    v, u = residuals
    accumulate = jaxnets_conv._accumulation_dtype(v.dtype)
    dv = jax.lax.dot_general(grad, u, (((2,), (2,)), ((0,), (0,))), preferred_element_type=accumulate)
    du = jax.lax.dot_general(v, grad, (((1,), (1,)), ((0,), (0,))), preferred_element_type=accumulate)
    return dv.astype(v.dtype), du.astype(u.dtype)


_products.defvjp(_products_forward, _products_backward)


def winograd_conv(images: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """Stride-1 3x3 cross-correlation, NHWC x HWIO -> NHWC, as jaxnets.conv.conv2d."""
    n, h, w, c = images.shape
    k = kernel.shape[3]
    (top, bottom), (left, right) = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    x = jnp.pad(images, ((0, 0), (top, 2 * tiles_h + 2 - h - top), (left, 2 * tiles_w + 2 - w - left), (0, 0)))
    u = jnp.einsum("ai,ijck,bj->abck", G.astype(kernel.dtype), kernel, G.astype(kernel.dtype)).reshape(16, c, k)
    m = _products(_input_transform(x, tiles_h, tiles_w), u)
    return _output_transform(m, n, tiles_h, tiles_w)[:, :out_h, :out_w]


def timed(fn, *args) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="32x128x1", help="batch x image side x channels")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch, side, channels = map(int, args.size.split("x"))
    shapes = {
        shape: count
        for shape, count in inception_conv_shapes(batch, side, channels).items()
        if shape[1][:2] == (3, 3) and shape[2] == (1, 1)
    }
    totals = {}
    for dtype in args.dtypes.split(","):
        for (image_shape, kernel_shape, strides, padding), count in sorted(shapes.items()):
            key = jax.random.key(0)
            images = jax.random.normal(key, image_shape, jnp.float32)
            kernel = 0.1 * jax.random.normal(jax.random.fold_in(key, 1), kernel_shape, jnp.float32)
            reference = jax.lax.conv_general_dilated(
                images.astype(jnp.float64),
                kernel.astype(jnp.float64),
                strides,
                padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            images, kernel = images.astype(dtype), kernel.astype(dtype)
            dot = functools.partial(jaxnets_conv.conv2d, strides=strides, padding=padding, implementation="dot")
            wino = functools.partial(winograd_conv, padding=padding)
            row = {"dtype": dtype, "images": image_shape, "kernel": kernel_shape, "layers": count}
            for name, fn in (("dot", dot), ("winograd", wino)):
                out = np.asarray(jax.jit(fn)(images, kernel).astype(jnp.float64))
                scale = float(np.abs(np.asarray(reference)).max())
                row[f"{name}_max_error"] = float(np.abs(out - np.asarray(reference)).max()) / scale
            forward = {"dot": jax.jit(dot), "winograd": jax.jit(wino)}
            both = {
                name: jax.jit(jax.grad(lambda x, w, f=fn: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))
                for name, fn in (("dot", dot), ("winograd", wino))
            }
            for label, fns in (("forward", forward), ("fwd+bwd", both)):
                for fn in fns.values():
                    timed(fn, images, kernel)  # compile
                times = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(timed(fn, images, kernel))
                for name in fns:
                    median = statistics.median(times[name])
                    row[f"{label} {name} ms"] = round(1000 * median, 2)
                    totals[(dtype, label, name)] = totals.get((dtype, label, name), 0) + count * median
            print(json.dumps(row), flush=True)
    for dtype in args.dtypes.split(","):
        for label in ("forward", "fwd+bwd"):
            dot, wino = totals[(dtype, label, "dot")], totals[(dtype, label, "winograd")]
            print(
                f"{dtype} {label}, all {sum(shapes.values())} layers: dot {1000 * dot:.1f} ms, "
                f"winograd {1000 * wino:.1f} ms, winograd speed-up {dot / wino:.2f}x"
            )


if __name__ == "__main__":
    main()
