"""Inception3 (Inception v3) in Flax NNX, block for block torchvision's, on images [batch, height, width, channels].

Attribute names mirror torchvision's state_dict keys (Mixed_5b.branch1x1.conv): jaxnets.convert maps one to one.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxnets import conv as jaxnets_conv

# Smallest height/width the network accepts: below 75 the last stride-2 stage has nothing left (JAX would
# silently give NaN); the auxiliary head's 5x5 convolution needs the 17x17 grid that only 299 px inputs reach.
MIN_IMAGE_SIZE = 75
MIN_IMAGE_SIZE_AUX = 299

BATCHNORM_EPSILON = 0.001  # torchvision's BasicConv2d
# Flax keeps `momentum` of the old running statistic; torch mixes in `momentum` of the new one: 0.9 == torch 0.1.
BATCHNORM_MOMENTUM = 0.9

# transform_input: torchvision maps inputs normalised with ImageNet's mean/std to the (x - 0.5) / 0.5 scaling
# Google's original weights were trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def conv2d(
    images: jax.Array,
    kernel: jax.Array,
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """The one convolution every layer of Inception3 goes through: change its implementation here only.

    images: [batch, height, width, in_channels]; kernel: [kernel_h, kernel_w, in_channels, out_channels] (HWIO);
    stride: (stride_h, stride_w); padding: ((top, bottom), (left, right)) rows/columns of zeros, as torch's
    Conv2d(padding=...). Returns [batch, out_height, out_width, out_channels].
    jaxnets.conv picks the implementation: im2col + dots on CPU, lax.conv_general_dilated on GPU/TPU
    ($JAXNETS_CONV=lax|dot overrides).
    """
    return jaxnets_conv.conv2d(images, kernel, stride, padding)


def torch_truncated_normal(stddev: float) -> nnx.Initializer:
    """torch.nn.init.trunc_normal_(std=stddev, a=-2, b=2), torchvision's Inception3 weight init.

    torch cuts at -2 and 2 in absolute value, i.e. at 2/stddev standard deviations (20 for std 0.1), so the
    distribution is practically an untruncated normal; flax's truncated_normal(stddev) would cut at 2 stddevs.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        # Draw a power-of-two count and cut: one compiled sampler per size class instead of one per kernel
        # shape halves a cold Inception3 init on a 2-core CPU (~5 s instead of ~12 s).
        size = math.prod(shape)
        padded = 1 << max(size - 1, 0).bit_length()
        values = jax.random.truncated_normal(key, -2.0 / stddev, 2.0 / stddev, (padded,), dtype)
        return stddev * values[:size].reshape(shape)

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
        return conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding)


class BatchNorm2d(nnx.BatchNorm):
    """torch's BatchNorm2d on NHWC images: nnx.BatchNorm's parameters and statistics, torch's running statistics.

    Flax folds the biased batch variance into the running variance, torch the unbiased one (times n/(n-1), n the
    values per channel) and counts batches in num_batches_tracked; this does as torch, so after a train step both
    frameworks hold the same state. The forward pass is written out rather than inherited because flax's
    `variable[...] = value` probes `value.sharding`, which on a JAX tracer builds an error message by walking
    everything traced so far: tracing Inception3's train step took 4.6 s, 3 s of it there (jax 0.10.2, flax
    0.12.8; fixed in later JAX). `set_value` assigns without the probe.
    """

    def __init__(self, num_features: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=BATCHNORM_EPSILON, momentum=BATCHNORM_MOMENTUM, dtype=dtype, rngs=rngs)
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [batch, height, width, features]; mask: [batch, 1, 1, 1] bool, rows counted in batch statistics.

        Statistics are float32 (bfloat16 inputs included) and, like torch, subtract the mean before squaring
        (E[x^2] - E[x]^2 cancels when the mean dwarfs the spread: values 300 +- 1 give a variance 1 % off).
        """
        x = x.astype(self.dtype)
        if self.use_running_average:
            mean, var = self.mean.get_value(), self.var.get_value()
        else:
            values = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(values, axis=(0, 1, 2), where=mask)
            var = jnp.mean(jnp.square(values - mean), axis=(0, 1, 2), where=mask)
            count = (x.shape[0] if mask is None else jnp.sum(mask)) * x.shape[1] * x.shape[2]
            unbiased = var * count / jnp.maximum(count - 1, 1)
            keep = self.momentum
            self.mean.set_value(lax.stop_gradient(keep * self.mean.get_value() + (1 - keep) * mean))
            self.var.set_value(lax.stop_gradient(keep * self.var.get_value() + (1 - keep) * unbiased))
            self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)
        multiplier = lax.rsqrt(var + self.epsilon) * self.scale.get_value()
        return ((x - mean) * multiplier + self.bias.get_value()).astype(self.dtype)


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

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.activate(self.conv(x), mask)

    def activate(self, convolved: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """BatchNorm and ReLU of this layer's convolution output."""
        return nnx.relu(self.bn(convolved, mask))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """torch's F.avg_pool2d(kernel_size=3, stride=1, padding=1) with its default count_include_pad=True.

    Summed in float32 at least: XLA:CPU's bfloat16 reduce_window is slow (bf16 train step b32 1x128^2: +5 %).
    """
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    pooled = nnx.avg_pool(wide, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
    return pooled.astype(x.dtype)


def _pooled_branch(branch_pool: BasicConv2d, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """torchvision's `branch_pool(avg_pool2d(x, 3, stride=1, padding=1))`, pooling after the 1x1 convolution.

    Both the pool (zeros padded, count_include_pad) and the bias-free 1x1 convolution are linear and act on
    different axes, so they commute: pooling the convolution's 32-192 output channels instead of its 192-2048 input
    channels is the same function at a 4-10x smaller pooling cost.
    """
    return branch_pool.activate(_avg_pool_3x3_same(branch_pool.conv(x)), mask)


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
def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    """torch's max_pool2d(kernel_size=3, stride=2): no padding, floor of the output size.

    The maximum of nine strided slices, with a hand-written gradient; autodiff of lax.reduce_window gives a
    select-and-scatter that XLA:CPU runs slowly (train step b32 1x128^2: +6 % float32, +12 % bfloat16).
    """
    return functools.reduce(jnp.maximum, _max_pool_windows(x))


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple[int, ...]]]:
    """Also keeps, per output, which of the nine window positions (0-8, row-major) held the first maximum."""
    windows = _max_pool_windows(x)
    pooled = functools.reduce(jnp.maximum, windows)
    # argmax (the first maximum, NaN counted as the largest like torch) is a reduction, so XLA keeps its result in
    # memory; a chain of elementwise selects was recomputed inside every use in the gradient (57 ms instead of
    # ~10 ms for the stem's pool, b32 1x128^2 float32).
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


_max_pool_3x3_stride_2.defvjp(_max_pool_forward, _max_pool_backward)


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, **conv)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, **conv)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **conv)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **conv)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, **conv)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        branch1x1 = self.branch1x1(x, mask)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x, mask), mask)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, mask), mask), mask)
        branch_pool = _pooled_branch(self.branch_pool, x, mask)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35x35 -> 17x17: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **conv)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **conv)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        branch3x3 = self.branch3x3(x, mask)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, mask), mask), mask)
        branch_pool = _max_pool_3x3_stride_2(x)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1) -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, **conv)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, **conv)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **conv)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, **conv)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **conv)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **conv)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **conv)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        branch1x1 = self.branch1x1(x, mask)
        branch7x7 = self.branch7x7_1(x, mask)
        branch7x7 = self.branch7x7_2(branch7x7, mask)
        branch7x7 = self.branch7x7_3(branch7x7, mask)
        branch7x7dbl = self.branch7x7dbl_1(x, mask)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl, mask)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl, mask)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl, mask)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl, mask)
        branch_pool = _pooled_branch(self.branch_pool, x, mask)
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17x17 -> 8x8: strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, **conv)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **conv)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, **conv)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **conv)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **conv)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **conv)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x, mask), mask)
        branch7x7x3 = self.branch7x7x3_1(x, mask)
        branch7x7x3 = self.branch7x7x3_2(branch7x7x3, mask)
        branch7x7x3 = self.branch7x7x3_3(branch7x7x3, mask)
        branch7x7x3 = self.branch7x7x3_4(branch7x7x3, mask)
        branch_pool = _max_pool_3x3_stride_2(x)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with expanded 1x3/3x1 filter banks -> 2048 channels."""

    def __init__(self, in_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, **conv)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, **conv)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **conv)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **conv)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **conv)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **conv)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **conv)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        branch1x1 = self.branch1x1(x, mask)
        branch3x3 = self.branch3x3_1(x, mask)
        branch3x3 = jnp.concatenate(
            [self.branch3x3_2a(branch3x3, mask), self.branch3x3_2b(branch3x3, mask)], axis=-1
        )
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x, mask), mask)
        branch3x3dbl = jnp.concatenate(
            [self.branch3x3dbl_3a(branch3x3dbl, mask), self.branch3x3dbl_3b(branch3x3dbl, mask)], axis=-1
        )
        branch_pool = _pooled_branch(self.branch_pool, x, mask)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionAux(nnx.Module):
    """Auxiliary head on the 17x17 grid: 5x5/3 average pool, 1x1 and 5x5 convolutions, fc (weights std 0.001)."""

    def __init__(self, in_channels: int, num_outputs: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv0 = BasicConv2d(in_channels, 128, 1, dtype=dtype, rngs=rngs)
        self.conv1 = BasicConv2d(128, 768, 5, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(
            768,
            num_outputs,
            kernel_init=torch_truncated_normal(0.001),
            bias_init=torch_uniform(768),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [batch, 17, 17, 768] -> [batch, num_outputs]."""
        x = nnx.avg_pool(x, (5, 5), strides=(3, 3), padding="VALID")  # [batch, 5, 5, 768]
        x = self.conv1(self.conv0(x, mask), mask)  # [batch, 1, 1, 768]
        return self.fc(jnp.mean(x, axis=(1, 2)))


def _linear_head(
    head_features: Sequence[int], num_outputs: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Linear | nnx.Sequential:
    """torchvision's fc (weights std 0.1), or the CosmoML head 2048 -> head_features... -> num_outputs with ReLUs.

    The CosmoML head replaces torchvision's fc after construction (`model.fc = nn.Sequential(Linear, ReLU, ...)`),
    so its layers start from nn.Linear's own init and its state_dict keys are fc.0, fc.2, fc.4.
    """
    if not head_features:
        return nnx.Linear(
            2048,
            num_outputs,
            kernel_init=torch_truncated_normal(0.1),
            bias_init=torch_uniform(2048),
            dtype=dtype,
            rngs=rngs,
        )
    sizes = [2048, *head_features, num_outputs]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [
            nnx.Linear(
                fan_in,
                fan_out,
                kernel_init=torch_uniform(fan_in),
                bias_init=torch_uniform(fan_in),
                dtype=dtype,
                rngs=rngs,
            ),
            nnx.relu,
        ]
    return nnx.Sequential(*layers[:-1])


def _transform_input(images: jax.Array) -> jax.Array:
    """torchvision's transform_input on [batch, height, width, 3]: ImageNet mean/std scaling -> (x - 0.5) / 0.5."""
    mean = jnp.asarray(_IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(_IMAGENET_STD, images.dtype)
    return images * (std / 0.5) + (mean - 0.5) / 0.5


def _final_grid_size(size: int) -> int:
    """Height (or width) of Mixed_7c's output for an input of `size` pixels (0 or less: too small)."""
    stride_2 = lambda s: (s - 3) // 2 + 1  # 3x3, stride 2, no padding
    size = stride_2(size) - 2  # Conv2d_1a_3x3, Conv2d_2a_3x3 (Conv2d_2b_3x3 keeps the size)
    size = stride_2(size) - 2  # maxpool1, Conv2d_4a_3x3
    return stride_2(stride_2(stride_2(size)))  # maxpool2, Mixed_6a, Mixed_7a


class Inception3(nnx.Module):
    """torchvision's Inception3 with num_outputs outputs, on images [batch, height, width, in_channels].

    Same blocks, same weights layout (HWIO kernels), same function as torchvision's given the same weights.
    Modes as torchvision's: `model.train()` (the initial mode) normalises with batch statistics, updates the
    running statistics (torch momentum 0.1, unbiased variance), applies dropout and, with aux_logits, returns
    (outputs, aux_outputs); `model.eval()` uses the running statistics, no dropout, and returns outputs only.
    Outputs are float32 [batch, num_outputs]; `dtype` is the computation dtype (parameters stay float32).
    Dropout draws from `rngs` (its `dropout` stream, else its default one).
    """

    def __init__(
        self,
        num_outputs: int,
        *,
        in_channels: int = 3,
        aux_logits: bool = False,
        transform_input: bool = False,
        dropout: float = 0.5,
        head_features: Sequence[int] = (),
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if transform_input and in_channels != 3:
            raise ValueError(
                f"transform_input re-normalises 3 ImageNet (RGB) channels; got in_channels={in_channels}"
            )
        self.num_outputs = num_outputs
        self.in_channels = in_channels
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.head_features = tuple(int(n) for n in head_features)
        self.dtype = dtype
        # model.train()/model.eval() set `deterministic` on every module that has one (Dropout and this model):
        # here it plays torchvision's `self.training`, which decides whether the auxiliary head runs.
        self.deterministic = False

        conv = dict(dtype=dtype, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(in_channels, 32, 3, stride=2, **conv)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **conv)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **conv)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **conv)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **conv)
        self.Mixed_5b = InceptionA(192, pool_features=32, **conv)
        self.Mixed_5c = InceptionA(256, pool_features=64, **conv)
        self.Mixed_5d = InceptionA(288, pool_features=64, **conv)
        self.Mixed_6a = InceptionB(288, **conv)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **conv)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **conv)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **conv)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **conv)
        self.AuxLogits = InceptionAux(768, num_outputs, **conv) if aux_logits else None
        self.Mixed_7a = InceptionD(768, **conv)
        self.Mixed_7b = InceptionE(1280, **conv)
        self.Mixed_7c = InceptionE(2048, **conv)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc = _linear_head(self.head_features, num_outputs, **conv)

    @property
    def training(self) -> bool:
        """True in train mode (after model.train(), and initially), False after model.eval()."""
        return not self.deterministic

    def __call__(
        self, images: jax.Array, *, mask: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """images: [batch, height, width, in_channels] -> outputs [batch, num_outputs] (float32).

        In train mode with aux_logits, returns (outputs, aux_outputs), both [batch, num_outputs].
        mask: optional [batch] bool; in train mode only rows where it is True enter the batch statistics
        (padding rows of a last, incomplete batch leave BatchNorm untouched).
        """
        if mask is not None:
            mask = jnp.asarray(mask, bool)
        self._check_inputs(images, mask)
        if mask is not None:
            mask = mask.reshape(-1, 1, 1, 1)  # broadcasts over [batch, height, width, channels]
        x = images.astype(self.dtype)
        if self.transform_input:
            x = _transform_input(x)
        x = self.Conv2d_1a_3x3(x, mask)  # [batch, 149, 149, 32] for 299x299 inputs
        x = self.Conv2d_2a_3x3(x, mask)  # [batch, 147, 147, 32]
        x = self.Conv2d_2b_3x3(x, mask)  # [batch, 147, 147, 64]
        x = _max_pool_3x3_stride_2(x)  # [batch, 73, 73, 64]
        x = self.Conv2d_3b_1x1(x, mask)  # [batch, 73, 73, 80]
        x = self.Conv2d_4a_3x3(x, mask)  # [batch, 71, 71, 192]
        x = _max_pool_3x3_stride_2(x)  # [batch, 35, 35, 192]
        x = self.Mixed_5b(x, mask)  # [batch, 35, 35, 256]
        x = self.Mixed_5c(x, mask)  # [batch, 35, 35, 288]
        x = self.Mixed_5d(x, mask)  # [batch, 35, 35, 288]
        x = self.Mixed_6a(x, mask)  # [batch, 17, 17, 768]
        x = self.Mixed_6b(x, mask)
        x = self.Mixed_6c(x, mask)
        x = self.Mixed_6d(x, mask)
        x = self.Mixed_6e(x, mask)  # [batch, 17, 17, 768]
        aux = self.AuxLogits(x, mask) if self.AuxLogits is not None and self.training else None
        x = self.Mixed_7a(x, mask)  # [batch, 8, 8, 1280]
        x = self.Mixed_7b(x, mask)  # [batch, 8, 8, 2048]
        x = self.Mixed_7c(x, mask)  # [batch, 8, 8, 2048]
        x = jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1, flattened: [batch, 2048]
        x = self.dropout(x)
        outputs = self.fc(x).astype(jnp.float32)
        if aux is None:
            return outputs
        return outputs, aux.astype(jnp.float32)

    def _check_inputs(self, images: jax.Array, mask: jax.Array | None) -> None:
        """Shape errors a user understands, instead of NaN outputs (too small) or an XLA error (channels)."""
        if images.ndim != 4:
            raise ValueError(
                f"Inception3 expects images [batch, height, width, channels]; got shape {tuple(images.shape)}"
            )
        batch, height, width, channels = images.shape
        if channels != self.in_channels:
            raise ValueError(
                f"Inception3 built for {self.in_channels} channel(s) got images of shape {tuple(images.shape)} "
                f"with {channels} in the last axis; images are [batch, height, width, channels] "
                "(NCHW arrays from PyTorch: images.transpose(0, 2, 3, 1))"
            )
        with_aux = self.AuxLogits is not None and self.training
        minimum = MIN_IMAGE_SIZE_AUX if with_aux else MIN_IMAGE_SIZE
        if height < minimum or width < minimum:
            reason = "with aux_logits in train mode " if with_aux else ""
            raise ValueError(
                f"Inception3 {reason}needs images of at least {minimum}x{minimum} pixels; got {height}x{width}"
            )
        if mask is not None and tuple(mask.shape) != (batch,):
            raise ValueError(f"mask must be [batch] = ({batch},); got shape {tuple(mask.shape)}")
        # Batch statistics of a single value are meaningless; torch raises here too.
        if self.training and mask is None:
            smallest = batch * _final_grid_size(height) * _final_grid_size(width)
            if with_aux:
                smallest = min(smallest, batch)  # the auxiliary head's last BatchNorm sees a 1x1 grid
            if smallest < 2:
                raise ValueError(
                    f"train mode needs more than one value per channel for batch statistics; a batch of {batch} "
                    f"image(s) of {height}x{width} gives {smallest} at the last BatchNorm: use a bigger batch "
                    "or model.eval()"
                )
