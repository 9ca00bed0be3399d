"""Two-dimensional convolution (NHWC images, HWIO kernels) in the form each backend runs fastest.

On CPU im2col + matrix products, forward and backward (XLA:CPU's dots beat its convolutions); on GPU/TPU lax's.
"""

import functools
import os
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]
Implementation = Literal["auto", "lax", "dot"]

# JAXNETS_CONV=lax|dot|auto overrides the default ("auto") for every call that does not name an implementation.
IMPLEMENTATION_ENV = "JAXNETS_CONV"
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# For programs that differentiate conv2d: XLA:CPU removes optimization barriers before it merges common
# subexpressions ("cse_barrier_expander"), which would undo the recomputation in `_conv_dot_backward`. Kept, the
# barriers are no-ops at run time. Figures: README, Benchmarks.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}

# Why dots on CPU: XLA:CPU's convolution gradients (whole-image kernel windows, strided input gradients) and its
# bfloat16 convolutions are slow, while its matrix products run near the CPU's peak, so im2col + dot wins the train
# step overall even where lax wins a single layer. Figures: README, Benchmarks, "Why the code is as it is";
# per-layer measurements: bench/conv_shapes.py.


def conv2d(
    images: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    *,
    implementation: Implementation | None = None,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Cross-correlation as torch's Conv2d (no bias) and lax.conv_general_dilated(..., ("NHWC", "HWIO", "NHWC")).

    images: [batch, height, width, in_channels]; kernel: [kernel_height, kernel_width, in_channels, out_channels];
    strides: (stride_height, stride_width); padding: ((top, bottom), (left, right)) rows/columns of zeros.
    Returns [batch, out_height, out_width, out_channels] with out = (in + pad_low + pad_high - kernel) // stride + 1,
    in the dtype of images and kernel (promoted). bfloat16 inputs are multiplied in bfloat16 and summed in float32.

    implementation: "lax" (lax.conv_general_dilated), "dot" (im2col + matrix products, forward and backward), or
    "auto" (the default, also read from $JAXNETS_CONV): "lax" on GPU/TPU; on CPU "dot", except that the forward without
    a gradient of the float32 layers where XLA's convolution is faster runs as "lax" (`lax_forward_is_faster`).
    Chosen at trace time.
    """
    strides = (int(strides[0]), int(strides[1]))
    padding = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    _check_shapes(images, kernel, strides, padding)
    dtype = jnp.result_type(images, kernel)
    images, kernel = images.astype(dtype), kernel.astype(dtype)
    requested = _requested(implementation)
    if _resolve(requested) == "lax":
        return _conv_lax(images, kernel, strides, padding, precision)
    lax_forward = requested == "auto" and lax_forward_is_faster(images.shape, kernel.shape, strides, padding, dtype)
    return _conv_dot(images, kernel, strides, padding, precision, lax_forward)


def cpu_tuned() -> bool:
    """Whether the CPU-tuned forms run (here "dot"; BatchNorm's two-pass statistics): $JAXNETS_CONV, else the
    backend. One switch for every choice that differs between CPU and GPU/TPU, so a run never mixes them."""
    return _resolve(None) == "dot"


def _requested(implementation: Implementation | None) -> str:
    """The argument, else $JAXNETS_CONV, else "auto"."""
    return implementation or os.environ.get(IMPLEMENTATION_ENV) or "auto"


def _resolve(implementation: Implementation | None) -> str:
    """ "lax" or "dot" for what is requested (`_requested`): "auto" is "dot" on CPU only."""
    implementation = _requested(implementation)
    if implementation not in ("auto", "lax", "dot"):
        raise ValueError(f"conv2d implementation must be 'auto', 'lax' or 'dot'; got {implementation!r}")
    if implementation == "auto":
        # cuDNN's convolutions are what a GPU is built for (im2col measured slower there; README, Benchmarks);
        # XLA:CPU's are not (see above).
        return "dot" if jax.default_backend() == "cpu" else "lax"
    return implementation


def _check_shapes(images: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> None:
    if images.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"conv2d expects images [batch, height, width, channels] and kernel [height, width, in, out]; "
            f"got shapes {tuple(images.shape)} and {tuple(kernel.shape)}"
        )
    if images.shape[3] != kernel.shape[2]:
        raise ValueError(
            f"images have {images.shape[3]} channels (last axis of {tuple(images.shape)}) but the kernel "
            f"{tuple(kernel.shape)} expects {kernel.shape[2]} (its third axis, HWIO)"
        )
    for axis in (0, 1):
        padded = images.shape[1 + axis] + sum(padding[axis])
        if padded < kernel.shape[axis] or strides[axis] < 1:
            raise ValueError(
                f"a {kernel.shape[0]}x{kernel.shape[1]} kernel with stride {strides} and padding {padding} does not "
                f"fit images of shape {tuple(images.shape)}"
            )


def _conv_lax(images: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, precision) -> jax.Array:
    return lax.conv_general_dilated(
        images, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS, precision=precision
    )


def _accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype | None:
    """float32 accumulation for 16-bit floats (bf16 dots run on AVX512-BF16/AMX several times faster than float32)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def _matmul(a: jax.Array, b: jax.Array, contract_a: Sequence[int], contract_b: Sequence[int], precision, out_dtype):
    """dot_general over the given axes, 16-bit inputs summed in float32, result cast to out_dtype."""
    product = lax.dot_general(
        a,
        b,
        ((tuple(contract_a), tuple(contract_b)), ((), ())),
        precision=precision,
        preferred_element_type=_accumulation_dtype(a.dtype),
    )
    return product.astype(out_dtype)


def _pointwise(kernel_size: tuple[int, int], strides: tuple[int, int], padding: Padding) -> bool:
    """A 1x1 kernel, stride 1, no padding: the columns are the images themselves."""
    return tuple(kernel_size) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0))


def _output_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    """How many kernel positions one axis of the padded images holds."""
    return (size + sum(padding) - kernel) // stride + 1


def patches(images: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int], padding: Padding) -> jax.Array:
    """im2col: every kernel window of the zero-padded images as one row.

    images: [batch, height, width, channels] -> [batch, out_height, out_width, kernel_h * kernel_w * channels],
    ordered (row, column, channel) like an HWIO kernel reshaped to [kernel_h * kernel_w * channels, out].
    """
    kernel_h, kernel_w = kernel_size
    if _pointwise(kernel_size, strides, padding):
        return images
    batch, height, width, channels = images.shape
    out_h = _output_size(height, kernel_h, strides[0], padding[0])
    out_w = _output_size(width, kernel_w, strides[1], padding[1])
    images = jnp.pad(images, ((0, 0), padding[0], padding[1], (0, 0)))

    def window(row: int, column: int) -> jax.Array:
        start = (0, row, column, 0)
        stop = (batch, row + (out_h - 1) * strides[0] + 1, column + (out_w - 1) * strides[1] + 1, channels)
        sliced = lax.slice(images, start, stop, (1, strides[0], strides[1], 1))
        return sliced.reshape(batch, out_h, out_w, 1, 1, channels)

    # The windows are stacked on axes of their own, kernel rows and columns, not on the channel axis: XLA:CPU then
    # builds the columns in one pass of one kernel (it fuses a concatenate of at most 8 operands that is not on the
    # innermost axis), instead of copying each window into a buffer of its own and then all of them again.
    rows = [jnp.concatenate([window(row, column) for column in range(kernel_w)], axis=4) for row in range(kernel_h)]
    return jnp.concatenate(rows, axis=3).reshape(batch, out_h, out_w, kernel_h * kernel_w * channels)


# Without a gradient, XLA:CPU's own float32 convolution beats im2col + dot on a middle band of layers: stride 1, a
# kernel wider than 1x1, an output grid at most 35 wide (the stem's larger grids run slower in lax) holding at least
# 10,000 positions over the batch (fewer lose: 1.14-1.16x the time with 5,408 and 3,136 at b32 1x128^2). Inception3's
# Mixed_5 and Mixed_6 blocks at b64 3x299^2 qualify (evaluation 0.85-0.87x the time), Mixed_5 at b128 1x128^2 (0.89x).
# bfloat16 convolutions are slow in XLA:CPU (1.05x). Figures: docs/cpu_performance.md, "lax in the middle of the
# network".
LAX_FORWARD_WIDTH = 35
LAX_FORWARD_POSITIONS = 10_000


def lax_forward_is_faster(image_shape, kernel_shape, strides: tuple[int, int], padding: Padding, dtype) -> bool:
    """Whether "auto" on CPU runs this layer's no-gradient forward as lax.conv (see LAX_FORWARD_WIDTH)."""
    batch, height, width = image_shape[:3]
    kernel_h, kernel_w = kernel_shape[:2]
    if jnp.dtype(dtype) != jnp.float32 or strides != (1, 1) or (kernel_h, kernel_w) == (1, 1):
        return False
    out_h = _output_size(height, kernel_h, 1, padding[0])
    out_w = _output_size(width, kernel_w, 1, padding[1])
    return max(out_h, out_w) <= LAX_FORWARD_WIDTH and batch * out_h * out_w >= LAX_FORWARD_POSITIONS


# Without a gradient, the columns are built for a slice of the batch at a time, none larger than this: the whole
# batch's (e.g. 1.6 GB for each of the stem's 147x147 layers at batch 64, 3x299 px) were most of the no-gradient
# forward's memory. Figures: README, Benchmarks.
CHUNK_BYTES = 128 * 2**20


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_dot(
    images: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, precision, lax_forward: bool
) -> jax.Array:
    """im2col + matrix products over slices of the batch (see CHUNK_BYTES), or lax's convolution if `lax_forward`;
    differentiated, im2col for the whole batch at once (_conv_dot_forward), as the backward's products need."""
    if lax_forward:
        return _conv_lax(images, kernel, strides, padding, precision)
    chunk = _chunk(images.shape, kernel.shape, strides, padding, jnp.dtype(images.dtype).itemsize)
    return in_batch_slices(lambda part: _conv_dot_batch(part, kernel, strides, padding, precision), images, chunk)


def _chunk(image_shape, kernel_shape, strides: tuple[int, int], padding: Padding, itemsize: int) -> int:
    """The largest number of images that divides the batch and whose columns fit in CHUNK_BYTES (at least 1)."""
    batch, height, width, in_channels = image_shape
    kernel_h, kernel_w = kernel_shape[:2]
    if _pointwise((kernel_h, kernel_w), strides, padding):
        return batch  # no columns to build
    out_h = _output_size(height, kernel_h, strides[0], padding[0])
    out_w = _output_size(width, kernel_w, strides[1], padding[1])
    return slice_size(batch, out_h * out_w * kernel_h * kernel_w * in_channels * itemsize, CHUNK_BYTES)


def slice_size(batch: int, bytes_per_image: int, budget: int) -> int:
    """The largest number of images that divides the batch and takes at most `budget` bytes (at least 1)."""
    return max([size for size in range(1, batch + 1) if batch % size == 0 and size * bytes_per_image <= budget] or [1])


def in_batch_slices(fn, images: jax.Array, size: int) -> jax.Array:
    """fn(images) computed `size` images at a time (lax.map over slices of the batch), for a per-image fn; one
    call when size is the whole batch."""
    batch = images.shape[0]
    if size == batch:
        return fn(images)
    outputs = lax.map(fn, images.reshape(batch // size, size, *images.shape[1:]))
    return outputs.reshape(batch, *outputs.shape[2:])


def _conv_dot_batch(images: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, precision):
    """im2col + one matrix product: [batch * out_h * out_w, k_h * k_w * in] @ [k_h * k_w * in, out]."""
    kernel_h, kernel_w, in_channels, out_channels = kernel.shape
    columns = patches(images, (kernel_h, kernel_w), strides, padding)
    weights = kernel.reshape(kernel_h * kernel_w * in_channels, out_channels)
    return _matmul(columns, weights, (3,), (0,), precision, images.dtype)


def _conv_dot_forward(images, kernel, strides, padding, precision, lax_forward):
    return _conv_dot_batch(images, kernel, strides, padding, precision), (images, kernel)


def _conv_dot_backward(strides, padding, precision, lax_forward, residuals, output_grad):
    """Both gradients as matrix products, the transposes of the forward one.

    A custom rule rather than autodiff so bfloat16 stays bfloat16 into the dots: autodiff of a dot with float32
    accumulation feeds the float32 cotangent in and upcasts the other operand, i.e. float32 dots, an order of
    magnitude slower on a bfloat16-capable CPU.
    """
    images, kernel = residuals
    kernel_h, kernel_w, in_channels, out_channels = kernel.shape
    weights = kernel.reshape(kernel_h * kernel_w * in_channels, out_channels)

    # d columns = d output @ weights^T, then col2im adds each window's share back onto the image. For 16-bit inputs
    # both stay in float32 (XLA adds float32 much faster than bfloat16) and the image gradient is rounded once.
    accumulate = _accumulation_dtype(images.dtype) or images.dtype
    columns_grad = _matmul(output_grad, weights, (3,), (1,), precision, accumulate)
    col2im = jax.linear_transpose(
        lambda x: patches(x, (kernel_h, kernel_w), strides, padding), jax.ShapeDtypeStruct(images.shape, accumulate)
    )
    images_grad = col2im(columns_grad)[0].astype(images.dtype)

    # The columns are built again from the saved images, behind a barrier that XLA does not see through (with
    # COMPILER_OPTIONS), so it cannot reuse the forward's: kept from the forward to the backward, the columns of every
    # layer (k_h * k_w times its input) were most of the train step's memory, and building them costs less than
    # keeping them (README, Benchmarks).
    if not _pointwise((kernel_h, kernel_w), strides, padding):
        images, output_grad = lax.optimization_barrier((images, output_grad))
    columns = patches(images, (kernel_h, kernel_w), strides, padding)
    # d weights = columns^T @ d output, summed over batch and grid: [k_h * k_w * in, out]. Written as
    # (d output^T @ columns)^T: XLA's dot wants its left operand's contracted axis innermost, so this way it
    # transposes d output (out channels wide) instead of the k_h * k_w times wider columns.
    kernel_grad = _matmul(output_grad, columns, (0, 1, 2), (0, 1, 2), precision, kernel.dtype).T
    return images_grad, kernel_grad.reshape(kernel.shape)


_conv_dot.defvjp(_conv_dot_forward, _conv_dot_backward)
