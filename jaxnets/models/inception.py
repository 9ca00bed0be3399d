"""Inception3 (Inception v3) in Flax NNX, block for block torchvision's, on images [batch, height, width, channels].

Attribute names mirror torchvision's state_dict keys (Mixed_5b.branch1x1.conv): jaxnets.convert maps one to one.
The layers (Conv2d, BatchNorm2d, BasicConv2d, pools) and torch's initialisers are in jaxnets.models.layers.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets import conv
from jaxnets.models.layers import (
    BasicConv2d,
    avg_pool_3x3_same,
    max_pool_3x3_stride_2,
    torch_truncated_normal,
    torch_uniform,
)

# Smallest height/width the network accepts: below 75 the last stride-2 stage has nothing left (JAX would
# silently give NaN); the auxiliary head's 5x5 convolution needs the 17x17 grid that only 299 px inputs reach.
MIN_IMAGE_SIZE = 75
MIN_IMAGE_SIZE_AUX = 299

# In eval mode on CPU the stem (the layers before Mixed_5b) runs over slices of the batch whose widest im2col
# columns (Conv2d_2b's) take at most this: the whole batch's stem activations at 147x147 were most of the evaluation's
# memory, and the slices run faster too. Each image's result is the same: BatchNorm uses its running statistics.
# Figures: docs/cpu_performance.md, "The stem in slices".
STEM_SLICE_BYTES = 32 * 2**20

# transform_input: torchvision maps inputs normalised with ImageNet's mean/std to the (x - 0.5) / 0.5 scaling
# Google's original weights were trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _pooled_branch(branch_pool: BasicConv2d, x: jax.Array) -> jax.Array:
    """torchvision's `branch_pool(avg_pool2d(x, 3, stride=1, padding=1))`, pooling after the 1x1 convolution.

    Both the pool (zeros padded, count_include_pad) and the bias-free 1x1 convolution are linear and act on
    different axes, so they commute: pooling the convolution's 32-192 output channels instead of its 192-2048 input
    channels is the same function at a 4-10x smaller pooling cost.
    """
    return branch_pool.activate(avg_pool_3x3_same(branch_pool.conv(x)))


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

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = _pooled_branch(self.branch_pool, x)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35x35 -> 17x17: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, rngs=rngs)
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **conv)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **conv)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = max_pool_3x3_stride_2(x)
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

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_1(x)
        branch7x7 = self.branch7x7_2(branch7x7)
        branch7x7 = self.branch7x7_3(branch7x7)
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = _pooled_branch(self.branch_pool, x)
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

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_2(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_3(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_4(branch7x7x3)
        branch_pool = max_pool_3x3_stride_2(x)
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

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=-1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jnp.concatenate(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], axis=-1
        )
        branch_pool = _pooled_branch(self.branch_pool, x)
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

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, 17, 17, 768] -> [batch, num_outputs]."""
        x = nnx.avg_pool(x, (5, 5), strides=(3, 3), padding="VALID")  # [batch, 5, 5, 768]
        x = self.conv1(self.conv0(x))  # [batch, 1, 1, 768]
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
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
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
            raise ValueError(f"transform_input re-normalises 3 ImageNet (RGB) channels; got in_channels={in_channels}")
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

    def __call__(self, images: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        """images: [batch, height, width, in_channels] -> outputs [batch, num_outputs] (float32).

        In train mode with aux_logits, returns (outputs, aux_outputs), both [batch, num_outputs].
        """
        self._check_inputs(images)
        x = images.astype(self.dtype)
        if self.transform_input:
            x = _transform_input(x)
        if self.training or not conv.cpu_tuned():
            x = self._stem(x)
        else:
            x = conv.in_batch_slices(self._stem, x, self._stem_slice(x))
        x = self.Mixed_5b(x)  # [batch, 35, 35, 256]
        x = self.Mixed_5c(x)  # [batch, 35, 35, 288]
        x = self.Mixed_5d(x)  # [batch, 35, 35, 288]
        x = self.Mixed_6a(x)  # [batch, 17, 17, 768]
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # [batch, 17, 17, 768]
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        x = self.Mixed_7a(x)  # [batch, 8, 8, 1280]
        x = self.Mixed_7b(x)  # [batch, 8, 8, 2048]
        x = self.Mixed_7c(x)  # [batch, 8, 8, 2048]
        x = jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1, flattened: [batch, 2048]
        x = self.dropout(x)
        outputs = self.fc(x).astype(jnp.float32)
        if aux is None:
            return outputs
        return outputs, aux.astype(jnp.float32)

    def _stem(self, x: jax.Array) -> jax.Array:
        x = self.Conv2d_1a_3x3(x)  # [batch, 149, 149, 32] for 299x299 inputs
        x = self.Conv2d_2a_3x3(x)  # [batch, 147, 147, 32]
        x = self.Conv2d_2b_3x3(x)  # [batch, 147, 147, 64]
        x = max_pool_3x3_stride_2(x)  # [batch, 73, 73, 64]
        x = self.Conv2d_3b_1x1(x)  # [batch, 73, 73, 80]
        x = self.Conv2d_4a_3x3(x)  # [batch, 71, 71, 192]
        return max_pool_3x3_stride_2(x)  # [batch, 35, 35, 192]

    def _stem_slice(self, x: jax.Array) -> int:
        """Images per slice of the stem in eval mode (STEM_SLICE_BYTES): Conv2d_2b's columns are 3x3 windows of its
        32 channels on the grid Conv2d_1a (stride 2) and Conv2d_2a (valid) leave."""
        batch, height, width, _ = x.shape
        grid = ((height - 3) // 2 - 1) * ((width - 3) // 2 - 1)
        return conv.slice_size(batch, grid * 3 * 3 * 32 * jnp.dtype(x.dtype).itemsize, STEM_SLICE_BYTES)

    def _check_inputs(self, images: jax.Array) -> None:
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
        # Batch statistics of a single value are meaningless; torch raises here too.
        if self.training:
            smallest = batch * _final_grid_size(height) * _final_grid_size(width)
            if with_aux:
                smallest = min(smallest, batch)  # the auxiliary head's last BatchNorm sees a 1x1 grid
            if smallest < 2:
                raise ValueError(
                    f"train mode needs more than one value per channel for batch statistics; a batch of {batch} "
                    f"image(s) of {height}x{width} gives {smallest} at the last BatchNorm: use a bigger batch "
                    "or model.eval()"
                )
