"""Layers and initialisers shared by the networks: torch-style initialisers, Conv2d, BatchNorm2d, BasicConv2d
and the pools Inception3 uses, all on images [batch, height, width, channels] (NHWC) and torch's semantics.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxnets.conv import conv2d, cpu_tuned

BATCHNORM_EPSILON = 0.001  # torchvision's BasicConv2d
# Flax keeps `momentum` of the old running statistic; torch mixes in `momentum` of the new one: 0.9 == torch 0.1.
BATCHNORM_MOMENTUM = 0.9


def torch_truncated_normal(stddev: float) -> nnx.Initializer:
    """torch.nn.init.trunc_normal_(std=stddev, a=-2, b=2), torchvision's Inception3 weight init.

    torch cuts at -2 and 2 in absolute value, i.e. at 2/stddev standard deviations (20 for std 0.1), so the
    distribution is practically an untruncated normal; flax's truncated_normal(stddev) would cut at 2 stddevs.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        # Draw a power-of-two count and cut: one compiled sampler per size class instead of one per kernel
        # shape, so a cold Inception3 init compiles a handful of samplers, not ~100.
        size = math.prod(shape)
        padded = 1 << max(size - 1, 0).bit_length()
        values = jax.random.truncated_normal(key, -2.0 / stddev, 2.0 / stddev, (padded,), dtype)
        if isinstance(values, jax.core.Tracer):  # under jit or nnx.eval_shape: stay symbolic
            return stddev * values[:size].reshape(shape)
        # Eagerly, cut, reshape and scale on the host: jnp would compile each of the three once per kernel shape
        # (a cold Inception3 build: 148 -> 29 compilations, 11.2 -> 5.4 s). Same float32 product, bit for bit.
        host = np.asarray(values)[:size].reshape(shape)
        return jax.device_put(host * np.asarray(stddev, host.dtype))

    return init


def torch_uniform(fan_in: int) -> nnx.Initializer:
    """torch.nn.Linear's default init: uniform in +-1/sqrt(fan_in) (its bias always, its weight when not reset)."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class Conv2d(nnx.Module):
    """torch's nn.Conv2d(bias=False) in NHWC: kernel [kernel_h, kernel_w, in_channels, out_channels] (HWIO)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_h, kernel_w = _pair(kernel_size)
        pad_h, pad_w = _pair(padding)
        # torchvision's init loop gives every Conv2d std 0.1 (its InceptionAux.conv1.stddev = 0.01 sits on the
        # BasicConv2d wrapper, which the loop never reads).
        self.kernel = nnx.Param(
            torch_truncated_normal(0.1)(rngs.params(), (kernel_h, kernel_w, in_channels, out_channels))
        )
        self.stride = _pair(stride)
        self.padding = ((pad_h, pad_h), (pad_w, pad_w))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, height, width, in_channels] -> [batch, out_height, out_width, out_channels]."""
        # jaxnets.conv picks the implementation: im2col + dots on CPU, lax.conv_general_dilated on GPU/TPU
        # ($JAXNETS_CONV=lax|dot overrides).
        return conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding)


class BatchNorm2d(nnx.BatchNorm):
    """torch's BatchNorm2d on NHWC images: nnx.BatchNorm's parameters and statistics, torch's running statistics.

    Flax folds the biased batch variance into the running variance, torch the unbiased one (times n/(n-1), n the
    values per channel) and counts batches in num_batches_tracked; this does as torch, so after a train step both
    frameworks hold the same state. The forward pass is written out rather than inherited because flax's
    `variable[...] = value` probes `value.sharding`, which on a JAX tracer walks everything traced so far (most
    of the train step's tracing time; README "Benchmarks"); `set_value` assigns without the probe.
    """

    def __init__(self, num_features: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=BATCHNORM_EPSILON, momentum=BATCHNORM_MOMENTUM, dtype=dtype, rngs=rngs)
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, height, width, features] -> the same shape.

        Statistics are float32 (bfloat16 inputs included); see `batch_statistics`.
        """
        x = x.astype(self.dtype)
        scale, bias = self.scale.get_value(), self.bias.get_value()
        if self.use_running_average:
            mean, var = self.mean.get_value(), self.var.get_value()
            return _normalize(x, mean, lax.rsqrt(var + self.epsilon), scale, bias)
        y, (mean, var) = batch_norm_train(x, scale, bias, self.epsilon, not cpu_tuned())
        count = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var * count / jnp.maximum(count - 1, 1)
        keep = self.momentum
        self.mean.set_value(lax.stop_gradient(keep * self.mean.get_value() + (1 - keep) * mean))
        self.var.set_value(lax.stop_gradient(keep * self.var.get_value() + (1 - keep) * unbiased))
        self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)
        return y


def _normalize(x: jax.Array, mean: jax.Array, inv_std: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    return ((x - mean) * (inv_std * scale) + bias).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, one_pass: bool
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Train-mode BatchNorm of x [batch, height, width, channels]: (y, (mean, var)), y normalised with the batch's
    float32 statistics (`batch_statistics`), mean and var for the running averages (no gradient flows through
    them).

    The gradient is the closed form dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)): two sums in
    one pass over dy. Autodiff of the statistics also differentiates through the mean inside the variance, one
    more pass per layer over a sum that is zero.
    """
    return _batch_norm_forward(x, scale, bias, epsilon, one_pass)[0]


def _batch_norm_forward(x, scale, bias, epsilon, one_pass):
    mean, var = batch_statistics(x.astype(jnp.promote_types(x.dtype, jnp.float32)), one_pass=one_pass)
    inv_std = lax.rsqrt(var + epsilon)
    return (_normalize(x, mean, inv_std, scale, bias), (mean, var)), (x, mean, inv_std, scale)


def _batch_norm_backward(epsilon, one_pass, residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dy = cotangents[0].astype(mean.dtype)
    axes, count = (0, 1, 2), x.shape[0] * x.shape[1] * x.shape[2]
    x_hat = (x.astype(mean.dtype) - mean) * inv_std
    sum_dy, sum_dy_x_hat = jnp.sum(dy, axes), jnp.sum(dy * x_hat, axes)
    dx = (scale * inv_std / count) * (count * dy - sum_dy - x_hat * sum_dy_x_hat)
    return dx.astype(x.dtype), sum_dy_x_hat.astype(scale.dtype), sum_dy.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


def batch_statistics(values: jax.Array, *, one_pass: bool) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance of values [batch, height, width, channels] over the first three axes.

    Both forms square deviations from a value near the mean: plain E[x^2] - E[x]^2 cancels when the mean dwarfs
    the spread (values 300 +- 1 give a variance 1 % off in float32). Two passes (the mean, then the squares about
    it, as torch) run faster on CPU; one pass (the sums of x - s and (x - s)^2, s the channel's first value) on
    GPU, where XLA reads the input once for both sums. Which runs follows `jaxnets.conv`'s switch (README,
    Benchmarks, "Why the code is as it is").
    """
    axes = (0, 1, 2)
    if not one_pass:
        mean = jnp.mean(values, axis=axes)
        return mean, jnp.mean(jnp.square(values - mean), axis=axes)
    shift = lax.stop_gradient(values[0, 0, 0])
    shifted_mean = jnp.mean(values - shift, axis=axes)
    var = jnp.maximum(jnp.mean(jnp.square(values - shift), axis=axes) - jnp.square(shifted_mean), 0)
    return shifted_mean + shift, var


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: convolution without bias, BatchNorm(eps=0.001), ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dtype=dtype, rngs=rngs
        )
        self.bn = BatchNorm2d(out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.activate(self.conv(x))

    def activate(self, convolved: jax.Array) -> jax.Array:
        """BatchNorm and ReLU of this layer's convolution output."""
        return nnx.relu(self.bn(convolved))


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """torch's F.avg_pool2d(kernel_size=3, stride=1, padding=1) with its default count_include_pad=True.

    Summed in float32 at least: XLA:CPU's bfloat16 reduce_window is slow.
    """
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    pooled = nnx.avg_pool(wide, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
    return pooled.astype(x.dtype)


def _max_pool_windows(x: jax.Array) -> list[jax.Array]:
    """The nine strided views [batch, out_h, out_w, channels] of a 3x3 stride-2 pool, row by row."""
    batch, height, width, channels = x.shape
    out_h, out_w = (height - 3) // 2 + 1, (width - 3) // 2 + 1
    return [
        lax.slice(x, (0, row, column, 0), (batch, row + 2 * out_h - 1, column + 2 * out_w - 1, channels), (1, 2, 2, 1))
        for row in range(3)
        for column in range(3)
    ]


@jax.custom_vjp
def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    """torch's max_pool2d(kernel_size=3, stride=2): no padding, floor of the output size.

    The maximum of nine strided slices, with a hand-written gradient; autodiff of lax.reduce_window gives a
    select-and-scatter that XLA:CPU runs slowly.
    """
    return functools.reduce(jnp.maximum, _max_pool_windows(x))


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple[int, ...]]]:
    """Also keeps, per output, which of the nine window positions (0-8, row-major) held the first maximum."""
    windows = _max_pool_windows(x)
    pooled = functools.reduce(jnp.maximum, windows)
    # argmax (the first maximum, NaN counted as the largest like torch) is a reduction, so XLA keeps its result in
    # memory; a chain of elementwise selects was recomputed inside every use in the gradient.
    first = jnp.argmax(jnp.stack(windows), axis=0).astype(jnp.int8)
    return pooled, (first, x.shape)


def _max_pool_backward(residuals: tuple[jax.Array, tuple[int, ...]], pooled_grad: jax.Array) -> tuple[jax.Array]:
    """Each window's gradient goes to its first maximum in row-major order, as torch (and lax) route ties.

    Window (i, j) at offset (row, column) covers input (2i + row, 2j + column). The gradient is assembled on the four
    parity grids of the input (even/odd row x even/odd column, each [out + 1, out + 1]) with plain one-row shifts,
    then interleaved: a few passes over memory, not nine interior-padded scatters.
    """
    first, (batch, height, width, channels) = residuals
    out_h, out_w = first.shape[1:3]
    accumulate = jnp.promote_types(pooled_grad.dtype, jnp.float32)
    grad = pooled_grad.astype(accumulate)

    def share(row: int, column: int, shift_row: int, shift_column: int) -> jax.Array:
        routed = jnp.where(first == 3 * row + column, grad, 0)
        return jnp.pad(routed, ((0, 0), (shift_row, 1 - shift_row), (shift_column, 1 - shift_column), (0, 0)))

    even_even = share(0, 0, 0, 0) + share(0, 2, 0, 1) + share(2, 0, 1, 0) + share(2, 2, 1, 1)
    even_odd = share(0, 1, 0, 0) + share(2, 1, 1, 0)
    odd_even = share(1, 0, 0, 0) + share(1, 2, 0, 1)
    odd_odd = share(1, 1, 0, 0)
    even_rows = jnp.stack([even_even, even_odd], axis=3)  # [batch, out_h + 1, out_w + 1, 2, channels]
    odd_rows = jnp.stack([odd_even, odd_odd], axis=3)
    interleaved = jnp.stack([even_rows, odd_rows], axis=2).reshape(batch, 2 * out_h + 2, 2 * out_w + 2, channels)
    return (interleaved[:, :height, :width].astype(pooled_grad.dtype),)


max_pool_3x3_stride_2.defvjp(_max_pool_forward, _max_pool_backward)
