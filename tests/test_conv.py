"""jaxnets.conv.conv2d against lax.conv_general_dilated: values and gradients for every Inception3 shape class,
float32 and bfloat16, both implementations, jit, the $JAXNETS_CONV override and shape errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnets import conv
from jaxnets.conv import COMPILER_OPTIONS, conv2d, patches

# (images shape, kernel shape HWIO, strides, padding): the classes Inception3 uses, on small grids.
SHAPE_CLASSES = {
    "1x1": ((2, 7, 7, 6), (1, 1, 6, 5), (1, 1), ((0, 0), (0, 0))),
    "3x3": ((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((0, 0), (0, 0))),
    "3x3 pad 1": ((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    "3x3 stride 2": ((2, 9, 9, 4), (3, 3, 4, 5), (2, 2), ((0, 0), (0, 0))),
    "3x3 stride 2 even grid": ((2, 10, 8, 4), (3, 3, 4, 5), (2, 2), ((0, 0), (0, 0))),
    "1x7 pad 0,3": ((2, 6, 6, 4), (1, 7, 4, 5), (1, 1), ((0, 0), (3, 3))),
    "7x1 pad 3,0": ((2, 6, 6, 4), (7, 1, 4, 5), (1, 1), ((3, 3), (0, 0))),
    "1x3 pad 0,1 on 2x2": ((2, 2, 2, 4), (1, 3, 4, 5), (1, 1), ((0, 0), (1, 1))),
    "3x3 pad 1 on 2x2": ((2, 2, 2, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    "5x5 pad 2": ((2, 7, 7, 4), (5, 5, 4, 5), (1, 1), ((2, 2), (2, 2))),
    "5x5 on 5x5 (aux head)": ((2, 5, 5, 4), (5, 5, 4, 5), (1, 1), ((0, 0), (0, 0))),
    "asymmetric pad, stride 1x2": ((2, 8, 9, 4), (3, 2, 4, 5), (1, 2), ((2, 0), (0, 1))),
}
IMPLEMENTATIONS = ("dot", "auto", "lax")
# XLA:CPU multiplies float32 in float32; GPUs default to TF32 (10-bit mantissa) for float32 dots and convolutions.
F32_TOLERANCE = 1e-5 if jax.default_backend() == "cpu" else 1e-2


def _lax_conv(images, kernel, strides, padding):
    """The reference, with float32 accumulation so bfloat16 inputs are compared with an exact-as-possible sum."""
    return lax.conv_general_dilated(
        images,
        kernel,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )


def _relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def _inputs(shape_class: str, dtype):
    images_shape, kernel_shape, strides, padding = SHAPE_CLASSES[shape_class]
    rng = np.random.default_rng(sum(map(ord, shape_class)))
    images = jnp.asarray(rng.standard_normal(images_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), dtype)
    output_shape = jax.eval_shape(lambda: _lax_conv(images, kernel, strides, padding)).shape
    output_grad = jnp.asarray(rng.standard_normal(output_shape), dtype)
    return images, kernel, strides, padding, output_grad


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape_class", SHAPE_CLASSES)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, F32_TOLERANCE), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_match_lax(shape_class, implementation, dtype, tolerance):
    images, kernel, strides, padding, output_grad = _inputs(shape_class, dtype)
    conv = lambda x, w: conv2d(x, w, strides, padding, implementation=implementation)
    output, vjp = jax.vjp(jax.jit(conv), images, kernel)
    images_grad, kernel_grad = jax.jit(vjp)(output_grad)

    # bfloat16 is compared with float32 maths on the same (already rounded) inputs: only the output rounding and,
    # for lax's bfloat16 convolutions, their own accumulation differ.
    f32 = lambda a: a.astype(jnp.float32)
    reference, reference_vjp = jax.vjp(lambda x, w: _lax_conv(x, w, strides, padding), f32(images), f32(kernel))
    reference_images_grad, reference_kernel_grad = reference_vjp(f32(output_grad))

    assert output.shape == reference.shape and output.dtype == dtype
    assert images_grad.dtype == dtype and kernel_grad.dtype == dtype
    assert _relative_error(output, reference) <= tolerance
    assert _relative_error(images_grad, reference_images_grad) <= tolerance
    assert _relative_error(kernel_grad, reference_kernel_grad) <= tolerance


@pytest.mark.parametrize("implementation", ("dot", "lax"))
def test_jax_grad_of_a_scalar_loss_matches_lax(implementation):
    images, kernel, strides, padding, _ = _inputs("3x3 stride 2", jnp.float32)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.tanh(conv(x, w)))
    grads = jax.jit(
        jax.grad(loss(lambda x, w: conv2d(x, w, strides, padding, implementation=implementation)), argnums=(0, 1))
    )(images, kernel)
    reference = jax.grad(loss(lambda x, w: _lax_conv(x, w, strides, padding)), argnums=(0, 1))(images, kernel)
    for grad, expected in zip(grads, reference, strict=True):
        assert _relative_error(grad, expected) <= F32_TOLERANCE


def test_patches_rows_match_an_hwio_kernel_reshaped():
    """Each patch row holds window values in (row, column, channel) order, so it dots with kernel.reshape(-1, out)."""
    images = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3)
    columns = patches(images, (2, 3), (1, 2), ((1, 0), (0, 0)))
    assert columns.shape == (2, 4, 2, 2 * 3 * 3)
    padded = np.pad(np.asarray(images), ((0, 0), (1, 0), (0, 0), (0, 0)))
    np.testing.assert_array_equal(columns[1, 2, 1], padded[1, 2:4, 2:5, :].reshape(-1))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion; on GPU the default is lax")
@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 7), (5, 5)])
def test_patches_are_built_by_one_kernel(kernel_size):
    """The windows stacked on axes of their own let XLA:CPU build all the columns in one loop (and the zero padding
    in at most one more): on the channel axis it copied each window into its own buffer, then all of them again."""
    images = jnp.zeros((4, 12, 12, 8), jnp.float32)
    padding = tuple((size // 2, size // 2) for size in kernel_size)
    program = jax.jit(lambda x: patches(x, kernel_size, (1, 1), padding)).lower(images).compile().as_text()
    kernels = re.findall(r"= \S+ (?:fusion|concatenate|slice|pad|copy)\(", program.split("\nENTRY")[1])
    assert 1 <= len(kernels) <= 2, kernels


def test_patches_of_bfloat16_are_bit_exact():
    """bfloat16 patches are copies: the values must come back untouched."""
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 6)), jnp.bfloat16)
    columns = patches(images, (3, 3), (1, 1), ((1, 1), (1, 1)))
    expected = patches(images.astype(jnp.float32), (3, 3), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(columns, np.float32), np.asarray(expected))


def _dots_in(hlo: str) -> list[str]:
    return re.findall(r"stablehlo\.dot_general[^\n]*", hlo)


def test_bfloat16_backward_multiplies_bfloat16_and_sums_in_float32():
    """The custom gradient keeps every dot's inputs bfloat16 (autodiff would upcast them to float32 dots)."""
    images, kernel, strides, padding, output_grad = _inputs("3x3 pad 1", jnp.bfloat16)
    backward = jax.jit(
        lambda x, w, g: jax.vjp(lambda a, b: conv2d(a, b, strides, padding, implementation="dot"), x, w)[1](g)
    )
    dots = _dots_in(backward.lower(images, kernel, output_grad).as_text())
    assert len(dots) == 2  # input gradient and kernel gradient; no convolution
    for dot in dots:
        operand_types = re.search(r":\s*\((.*)\)\s*->\s*(\S+)", dot)
        assert operand_types.group(1).count("xbf16>") == 2, dot
        assert operand_types.group(2).endswith("xf32>"), dot


def test_environment_variable_chooses_the_implementation(monkeypatch):
    images, kernel, strides, padding, _ = _inputs("3x3", jnp.float32)
    lowered = lambda: jax.jit(lambda x, w: conv2d(x, w, strides, padding)).lower(images, kernel).as_text()
    monkeypatch.setenv("JAXNETS_CONV", "lax")
    assert "stablehlo.convolution" in lowered() and not _dots_in(lowered())
    monkeypatch.setenv("JAXNETS_CONV", "dot")
    assert "stablehlo.convolution" not in lowered() and _dots_in(lowered())
    monkeypatch.setenv("JAXNETS_CONV", "auto")  # dots on CPU, lax's convolution on GPU/TPU
    assert ("stablehlo.convolution" in lowered()) == (jax.default_backend() != "cpu")
    monkeypatch.setenv("JAXNETS_CONV", "cudnn")
    with pytest.raises(ValueError, match="'auto', 'lax' or 'dot'"):
        lowered()


def test_argument_overrides_the_environment(monkeypatch):
    images, kernel, strides, padding, _ = _inputs("1x1", jnp.float32)
    monkeypatch.setenv("JAXNETS_CONV", "dot")
    hlo = jax.jit(lambda x, w: conv2d(x, w, strides, padding, implementation="lax")).lower(images, kernel).as_text()
    assert "stablehlo.convolution" in hlo


def test_shape_errors_name_the_shapes():
    images = jnp.zeros((2, 9, 9, 4))
    with pytest.raises(ValueError, match=r"4 channels .* expects 3"):
        conv2d(images, jnp.zeros((3, 3, 3, 5)))
    with pytest.raises(ValueError, match="images \\[batch, height, width, channels\\]"):
        conv2d(images[0], jnp.zeros((3, 3, 4, 5)))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(images, jnp.zeros((11, 3, 4, 5)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's passes; on GPU the default is lax")
def test_backward_builds_the_columns_again_instead_of_keeping_the_forwards():
    """Kept from the forward to the backward, every layer's float32 columns (9 times its input for a 3x3 kernel)
    were most of the train step's memory. Compiled with COMPILER_OPTIONS, the backward builds them again: each
    layer's columns are concatenated twice, and the compiled gradient needs less memory, with the same values."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((8, 32, 32, 16)), jnp.float32)
    kernels = tuple(jnp.asarray(rng.standard_normal((3, 3, 16, 16)) / 12, jnp.float32) for _ in range(2))

    def loss(kernels, images):
        hidden = jax.nn.relu(conv2d(images, kernels[0], padding=((1, 1), (1, 1)), implementation="dot"))
        return jnp.sum(conv2d(hidden, kernels[1], padding=((1, 1), (1, 1)), implementation="dot") ** 2)

    compiled = {
        name: jax.jit(jax.grad(loss), compiler_options=options).lower(kernels, images).compile()
        for name, options in (("merged", None), ("rebuilt", COMPILER_OPTIONS))
    }
    # A kernel that writes a layer's columns: 8 * 32 * 32 windows of 3 * 3 * 16 values, in whatever shape XLA gives.
    column_build = re.compile(r"%\S*concatenate\S* = f32\[(?:8,32,32,144|8192,144|8,32,32,3,3,16)\]")
    # The entry computation lists the kernels; the fused computations above it, their bodies.
    entry = {name: program.as_text().split("\nENTRY")[1] for name, program in compiled.items()}
    column_builds = {name: len(column_build.findall(text)) for name, text in entry.items()}
    assert column_builds["rebuilt"] == 4  # two layers, each in the forward and again in the backward
    assert column_builds["merged"] < 4
    temp = {name: program.memory_analysis().temp_size_in_bytes for name, program in compiled.items()}
    assert temp["rebuilt"] < temp["merged"]
    for merged, rebuilt in zip(compiled["merged"](kernels, images), compiled["rebuilt"](kernels, images), strict=True):
        np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(merged), rtol=1e-6)
    # bfloat16 builds them again too.
    bfloat16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (kernels, images))
    assert "optimization_barrier" in jax.jit(jax.grad(loss)).lower(*bfloat16).as_text()


def test_without_a_gradient_the_columns_are_built_a_slice_of_the_batch_at_a_time(monkeypatch):
    """The no-gradient forward (evaluation) builds the columns for as many images as fit in CHUNK_BYTES at a time:
    the same outputs, a fraction of the memory. Differentiated, the whole batch's at once, as before."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((12, 20, 20, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) / 8, jnp.float32)
    per_image = 18 * 18 * 72 * 4  # the columns of one image
    assert conv._chunk(images.shape, kernel.shape, (1, 1), ((0, 0), (0, 0)), 4) == 12  # 1.1 MB: all at once
    monkeypatch.setattr(conv, "CHUNK_BYTES", 5 * per_image)
    assert conv._chunk(images.shape, kernel.shape, (1, 1), ((0, 0), (0, 0)), 4) == 4  # 4 divides 12, 5 and 6 do not fit
    assert conv._chunk(images.shape, (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0)), 4) == 12  # 1x1: no columns
    monkeypatch.setattr(conv, "CHUNK_BYTES", per_image // 2)
    assert conv._chunk(images.shape, kernel.shape, (1, 1), ((0, 0), (0, 0)), 4) == 1  # never fewer than one image

    def forward(images, kernel):
        return conv2d(images, kernel, implementation="dot")

    monkeypatch.setattr(conv, "CHUNK_BYTES", 12 * per_image)
    whole = jax.jit(lambda *args: forward(*args)).lower(images, kernel).compile()
    monkeypatch.setattr(conv, "CHUNK_BYTES", 5 * per_image)
    sliced = jax.jit(lambda *args: forward(*args)).lower(images, kernel).compile()
    assert "while" in sliced.as_text() and "while" not in whole.as_text()
    assert sliced.memory_analysis().temp_size_in_bytes < whole.memory_analysis().temp_size_in_bytes / 2
    np.testing.assert_allclose(np.asarray(sliced(images, kernel)), np.asarray(whole(images, kernel)), rtol=1e-6)
    reference = lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(sliced(images, kernel)), np.asarray(reference), rtol=1e-4, atol=1e-4)
    gradient = jax.jit(jax.grad(lambda k: jnp.sum(forward(images, k) ** 2))).lower(kernel).as_text()
    assert "while" not in gradient  # the train step's program is the whole batch's


@pytest.mark.parametrize(
    "image_shape, kernel_shape, strides, padding, dtype, expected",
    [
        ((64, 35, 35, 96), (3, 3, 96, 96), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),  # Mixed_5 at 299 px
        ((64, 17, 17, 128), (1, 7, 128, 128), (1, 1), ((0, 0), (3, 3)), jnp.float32, True),  # Mixed_6 at 299 px
        ((64, 35, 35, 96), (3, 3, 96, 96), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16, False),  # bf16: slow in lax
        ((64, 35, 35, 96), (3, 3, 96, 96), (2, 2), ((0, 0), (0, 0)), jnp.float32, False),  # strided
        ((64, 35, 35, 96), (1, 1, 96, 96), (1, 1), ((0, 0), (0, 0)), jnp.float32, False),  # 1x1: no columns
        ((32, 13, 13, 96), (3, 3, 96, 96), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),  # 5,408 positions
        ((1, 147, 147, 32), (3, 3, 32, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),  # the stem's grid
    ],
)
def test_lax_forward_is_chosen_for_the_float32_middle_band(
    image_shape, kernel_shape, strides, padding, dtype, expected
):
    assert conv.lax_forward_is_faster(image_shape, kernel_shape, strides, padding, dtype) is expected


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the band is a CPU choice; on GPU the default is lax")
def test_auto_runs_the_middle_band_forward_as_lax_and_its_gradient_as_dots():
    """On CPU "auto" evaluates a float32 layer of the band with XLA's convolution, the same values as im2col, while
    its gradient (the train step) and an explicit "dot" stay im2col + matrix products."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((10, 35, 35, 4)), jnp.float32)  # 12,250 output positions
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 8)) / 6, jnp.float32)
    padding = ((1, 1), (1, 1))
    auto = jax.jit(lambda x, w: conv2d(x, w, padding=padding))
    dot = jax.jit(lambda x, w: conv2d(x, w, padding=padding, implementation="dot"))
    assert "stablehlo.convolution" in auto.lower(images, kernel).as_text()
    assert "stablehlo.convolution" not in dot.lower(images, kernel).as_text()
    gradient = jax.jit(jax.grad(lambda w: jnp.sum(conv2d(images, w, padding=padding) ** 2)))
    assert "stablehlo.convolution" not in gradient.lower(kernel).as_text()
    np.testing.assert_allclose(np.asarray(auto(images, kernel)), np.asarray(dot(images, kernel)), rtol=1e-5, atol=1e-5)
    small = images[:4]  # 4,900 positions: im2col
    assert "stablehlo.convolution" not in auto.lower(small, kernel).as_text()
