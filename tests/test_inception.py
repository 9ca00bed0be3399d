"""Inception3: torchvision's function given the same weights, torchvision's init and counts, clear shape errors.

Forward passes are few and shared (module-scoped fixtures): each new input shape costs seconds of compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxnets.convert import export_to_torch_state_dict, inception3_from_torch
from jaxnets.models import layers
from jaxnets.models.inception import Inception3, _linear_head, _pooled_branch, _transform_input
from jaxnets.models.layers import (
    BasicConv2d,
    BatchNorm2d,
    avg_pool_3x3_same,
    batch_statistics,
    max_pool_3x3_stride_2,
    torch_truncated_normal,
)

forward = nnx.jit(lambda model, images: model(images))


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the issue's parity measure."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def nhwc(images_nchw: np.ndarray) -> jax.Array:
    return jnp.asarray(images_nchw.transpose(0, 2, 3, 1))


def torchvision_inception3(torch, images, *, num_outputs, in_channels=3, aux_logits=True, dropout=0.5):
    """A random-init torchvision Inception3 (users' variant when in_channels != 3) in eval mode.

    Running statistics are fitted to `images` (random-init activations otherwise grow ~5x per layer), then moved
    away by +-20 %, and BatchNorm scales/biases moved away from 1/0, so that every imported number matters.
    """
    from torchvision.models import Inception3 as TorchInception3

    torch.manual_seed(0)
    model = TorchInception3(num_classes=num_outputs, aux_logits=aux_logits, init_weights=True, dropout=dropout)
    if in_channels != 3:  # what the lens-regression users do: a grayscale first convolution and a new fc
        model.Conv2d_1a_3x3.conv = torch.nn.Conv2d(in_channels, 32, kernel_size=3, stride=2, bias=False)
        model.fc = torch.nn.Linear(2048, num_outputs)
    batchnorms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.momentum = 1.0  # the running statistics become this batch's
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    with torch.no_grad():
        for bn in batchnorms:
            bn.momentum = 0.1
            bn.running_mean.mul_(torch.empty_like(bn.running_mean).uniform_(0.8, 1.2))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.2))
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def rgb_pair(torch):
    """torchvision's own Inception3 (3x299x299, aux head, 10 outputs) and its conversion, batch of 2."""
    images = np.random.default_rng(0).normal(size=(2, 3, 299, 299)).astype(np.float32)
    # No dropout: train-mode outputs must be comparable (torch and JAX draw different masks).
    torch_model = torchvision_inception3(torch, images, num_outputs=10, dropout=0.0)
    model = inception3_from_torch(torch_model.state_dict(), dropout=0.0)
    return torch_model, model, images


@pytest.fixture(scope="module")
def gray_pair(torch):
    """The lens users' variant: 1x128x128 images, 1-channel first conv, fc to 4 outputs, no aux, dropout 0.5."""
    images = np.random.default_rng(1).normal(size=(2, 1, 128, 128)).astype(np.float32)
    torch_model = torchvision_inception3(torch, images, num_outputs=4, in_channels=1, aux_logits=False)
    model = inception3_from_torch(torch_model.state_dict())
    return torch_model, model, images


@pytest.mark.slow
def test_eval_outputs_match_torchvision_3x299_with_aux(torch, rgb_pair):
    torch_model, model, images = rgb_pair
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(images)).numpy()
    model.eval()
    outputs = forward(model, nhwc(images))
    assert outputs.shape == (2, 10) and outputs.dtype == jnp.float32
    assert relative_error(outputs, expected) <= 1e-4


@pytest.mark.slow
def test_train_outputs_aux_and_running_statistics_match_torchvision(torch, rgb_pair):
    torch_model, model, images = rgb_pair
    torch_model.train()
    with torch.no_grad():
        expected, expected_aux = torch_model(torch.from_numpy(images))
    before = export_to_torch_state_dict(model)
    model.train()
    outputs, aux_outputs = forward(model, nhwc(images))

    assert outputs.shape == aux_outputs.shape == (2, 10)
    assert relative_error(outputs, expected.numpy()) <= 1e-4
    # The aux head's last BatchNorm normalises 2 values per channel (batch 2, 1x1 grid); where the two nearly
    # coincide it amplifies float rounding upstream (~2e-4 measured); the head alone matches to 1e-5 (next test).
    assert relative_error(aux_outputs, expected_aux.numpy()) <= 1e-3

    # Running statistics moved as torch's: momentum 0.1, unbiased variance, one more batch counted.
    after, expected_state = export_to_torch_state_dict(model), torch_model.state_dict()
    for name, value in expected_state.items():
        if name.endswith(("running_mean", "running_var")):
            assert relative_error(after[name].numpy(), value.numpy()) <= 1e-4, name
            assert not torch.equal(after[name], before[name]), name
        elif name.endswith("num_batches_tracked"):
            assert int(after[name]) == int(value) == int(before[name]) + 1, name
    torch_model.eval()
    model.eval()


@pytest.mark.slow
def test_aux_head_matches_torchvision_in_train_mode(torch, rgb_pair):
    torch_model, model, _ = rgb_pair
    features = np.abs(np.random.default_rng(2).normal(size=(2, 768, 17, 17))).astype(np.float32)
    torch_model.train()
    model.train()
    with torch.no_grad():
        expected = torch_model.AuxLogits(torch.from_numpy(features)).numpy()
    outputs = model.AuxLogits(nhwc(features))
    torch_model.eval()
    model.eval()
    assert outputs.shape == (2, 10)
    assert relative_error(outputs, expected) <= 1e-4


@pytest.mark.slow
def test_eval_outputs_match_torchvision_1x128_grayscale(torch, gray_pair):
    torch_model, model, images = gray_pair
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    model.eval()
    outputs = forward(model, nhwc(images))
    assert outputs.shape == (2, 4)
    # dropout=0.5 in this model: matching torch's eval outputs also shows dropout is off in eval mode.
    assert relative_error(outputs, expected) <= 1e-4


def test_eval_mode_runs_the_stem_over_slices_of_the_batch_with_the_same_outputs(monkeypatch):
    from jaxnets.models import inception

    model = Inception3(3, in_channels=1, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 75, 75, 1)).astype(np.float32))

    def lower(mode: str):
        getattr(model, mode)()
        graphdef, state = nnx.split(model)
        return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, images)

    lowered = {}
    for name, budget in (("whole", 2**40), ("sliced", 1)):  # one slice of 4 images; 4 slices of 1
        monkeypatch.setattr(inception, "STEM_SLICE_BYTES", budget)
        for mode in ("eval", "train"):
            lowered[name, mode] = lower(mode)
    assert "stablehlo.while" in lowered["sliced", "eval"].as_text()
    assert "stablehlo.while" not in lowered["whole", "eval"].as_text()
    assert lowered["sliced", "train"].as_text() == lowered["whole", "train"].as_text()  # batch statistics: whole
    state = nnx.state(model)
    np.testing.assert_array_equal(
        lowered["sliced", "eval"].compile()(state, images), lowered["whole", "eval"].compile()(state, images)
    )
    monkeypatch.setenv("JAXNETS_CONV", "lax")  # GPU/TPU's form: whole batches
    assert "stablehlo.while" not in lower("eval").as_text()


@pytest.mark.slow
def test_jitted_train_step_uses_dropout_and_updates_state(gray_pair):
    """The training loop's pattern (split once, plain jax.jit, merge with copy=True) in train mode."""
    _, model, images = gray_pair
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    model.eval()

    @jax.jit
    def step(params, state, images):
        model = nnx.merge(graphdef, params, state, copy=True)
        outputs = model(images)
        return outputs, nnx.state(model, nnx.Not(nnx.Param))

    first = nhwc(images)
    outputs, new_state = step(params, state, first)
    outputs_again, _ = step(params, new_state, first)

    bn = new_state["Conv2d_1a_3x3"]["bn"]
    assert int(bn["num_batches_tracked"][...]) == int(state["Conv2d_1a_3x3"]["bn"]["num_batches_tracked"][...]) + 1
    assert not np.allclose(bn["mean"][...], state["Conv2d_1a_3x3"]["bn"]["mean"][...])
    # Same inputs, next dropout draw: train-mode outputs differ only through dropout (batch statistics don't
    # depend on the running ones).
    assert not np.allclose(outputs[0], outputs_again[0])


def as_numbers(state):
    """A state's leaves as plain arrays (PRNG keys as their key data), for exact comparison."""
    return [
        jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
        for leaf in jax.tree.leaves(state)
    ]


def test_batchnorm_running_statistics_follow_torch():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4)) * 2.0 + 1.0
    bn = BatchNorm2d(4, rngs=nnx.Rngs(0))
    y = bn(x)
    real = np.asarray(x, np.float64)
    expected = (real - real.mean((0, 1, 2))) / np.sqrt(real.var((0, 1, 2)) + 0.001)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.1 * real.mean((0, 1, 2)), rtol=1e-5)
    # torch's running variance: 0.9 * 1 + 0.1 * unbiased variance over the 2 * 5 * 5 values per channel.
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * real.var((0, 1, 2), ddof=1), rtol=1e-5)
    assert int(bn.num_batches_tracked[...]) == 1


@pytest.mark.parametrize("one_pass", [False, True])
def test_batch_statistics_hold_when_the_mean_dwarfs_the_spread(one_pass):
    rng = np.random.default_rng(0)
    values = jnp.asarray(300.0 + rng.normal(size=(4, 6, 6, 3)), jnp.float32)
    values = values.at[0, 0, 0].add(10.0)  # the one-pass shift (each channel's first value) far from the mean
    real = np.asarray(values, np.float64)
    mean, var = batch_statistics(values, one_pass=one_pass)
    np.testing.assert_allclose(mean, real.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, real.var((0, 1, 2)), rtol=1e-4)
    # What both forms avoid: the plain E[x^2] - E[x]^2 of the same float32 values.
    plain = jnp.mean(jnp.square(values), (0, 1, 2)) - jnp.square(jnp.mean(values, (0, 1, 2)))
    assert np.abs(np.asarray(plain) / real.var((0, 1, 2)) - 1).max() > 1e-3


def test_one_and_two_pass_statistics_have_the_same_gradients():
    values = jax.random.normal(jax.random.key(1), (2, 5, 5, 4)) * 3.0 + 2.0

    def loss(values, one_pass):
        mean, var = batch_statistics(values, one_pass=one_pass)
        return jnp.sum(jnp.sin(mean)) + jnp.sum(jnp.cos(var))

    two, one = jax.grad(loss)(values, False), jax.grad(loss)(values, True)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one_pass", [False, True])
def test_batchnorm_closed_form_gradient_equals_autodiff(one_pass):
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (3, 4, 5, 6)) * 2.0 + 1.0
    scale, bias = jax.random.normal(keys[1], (6,)), jax.random.normal(keys[2], (6,))
    weights = jax.random.normal(keys[3], x.shape)

    def autodiff(x, scale, bias):  # the textbook forward, differentiated by JAX
        mean, var = batch_statistics(x, one_pass=one_pass)
        return jnp.sum(weights * jnp.tanh((x - mean) * lax.rsqrt(var + 0.001) * scale + bias))

    def closed_form(x, scale, bias):
        y, _ = layers.batch_norm_train(x, scale, bias, 0.001, one_pass)
        return jnp.sum(weights * jnp.tanh(y))

    expected, actual = jax.grad(autodiff, (0, 1, 2))(x, scale, bias), jax.grad(closed_form, (0, 1, 2))(x, scale, bias)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("implementation, one_pass", [("dot", False), ("lax", True)])
def test_batchnorm_statistics_follow_the_conv_switch(monkeypatch, implementation, one_pass):
    seen = []
    monkeypatch.setattr(layers, "batch_statistics", lambda values, one_pass: seen.append(one_pass) or (0.0, 1.0))
    monkeypatch.setenv("JAXNETS_CONV", implementation)
    BatchNorm2d(4, rngs=nnx.Rngs(0))(jnp.ones((1, 2, 2, 4)))
    assert seen == [one_pass]


def test_transform_input_matches_torchvision(torch, rgb_pair):
    torch_model, _, images = rgb_pair
    corner = images[:, :, :4, :4]
    torch_model.transform_input = True
    expected = torch_model._transform_input(torch.from_numpy(corner)).numpy()
    torch_model.transform_input = False
    actual = _transform_input(nhwc(corner))
    np.testing.assert_allclose(actual, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-7)


def parameter_count(model) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def abstract_model():
    """torchvision's default configuration with bf16 computation, shapes only (no weights drawn)."""
    return nnx.eval_shape(lambda: Inception3(1000, aux_logits=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))


def test_parameter_counts_equal_torchvision(abstract_model, rgb_pair):
    assert parameter_count(abstract_model) == 27_161_264
    assert parameter_count(abstract_model) - parameter_count(abstract_model.AuxLogits) == 23_834_568
    torch_model, model, _ = rgb_pair
    assert parameter_count(model) == sum(p.numel() for p in torch_model.parameters()) == 24_371_444
    head = nnx.eval_shape(lambda: _linear_head((1024, 512), 4, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    assert parameter_count(head) == (2048 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 4 + 4)


def test_bfloat16_computation_gives_float32_outputs(abstract_model):
    abstract_model.eval()
    images = jax.ShapeDtypeStruct((2, 75, 75, 3), jnp.float32)
    outputs = nnx.eval_shape(lambda model, images: model(images), abstract_model, images)
    assert outputs.shape == (2, 1000) and outputs.dtype == jnp.float32
    params = jax.tree.leaves(nnx.state(abstract_model, nnx.Param))
    assert {leaf.dtype for leaf in params} == {jnp.dtype(jnp.float32)}  # bf16 is the computation dtype only


@pytest.mark.slow
def test_initialisation_follows_torchvision():
    model = Inception3(4, aux_logits=True, head_features=(1024, 512), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    conv_kernels = [np.asarray(node[...]) for path, node in nnx.iter_graph(model) if path[-2:] == ("conv", "kernel")]
    assert len(conv_kernels) == 94 + 2  # torchvision's BasicConv2d layers, aux head included
    kernels = np.concatenate([kernel.ravel() for kernel in conv_kernels])
    # torch's trunc_normal_(std=0.1, a=-2, b=2): a normal with std 0.1 (the cut is 20 stds away).
    assert abs(kernels.std() - 0.1) < 0.001 and abs(kernels.mean()) < 0.001
    assert abs(np.mean(np.abs(kernels) > 0.2) - 0.0455) < 0.002  # 2-sigma tail of an untruncated normal
    assert abs(np.asarray(model.AuxLogits.fc.kernel[...]).std() - 0.001) < 0.0001
    # Linear biases keep torch's default uniform(+-1/sqrt(fan_in)).
    aux_bias = np.asarray(model.AuxLogits.fc.bias[...])
    assert np.all(np.abs(aux_bias) <= 1 / np.sqrt(768)) and np.abs(aux_bias).max() > 0.3 / np.sqrt(768)
    # The CosmoML head replaces torchvision's fc after construction: nn.Linear's own uniform init throughout.
    layers = [layer for layer in model.fc.layers if isinstance(layer, nnx.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in layers] == [(2048, 1024), (1024, 512), (512, 4)]
    for layer in layers[:2]:
        bound = 1 / np.sqrt(layer.in_features)
        kernel = np.asarray(layer.kernel[...])
        assert np.abs(kernel).max() <= bound and abs(kernel.std() - bound / np.sqrt(3)) < 0.01 * bound
    bn = model.Mixed_7c.branch_pool.bn
    np.testing.assert_array_equal(bn.scale[...], 1.0)
    np.testing.assert_array_equal(bn.bias[...], 0.0)
    np.testing.assert_array_equal(bn.mean[...], 0.0)
    np.testing.assert_array_equal(bn.var[...], 1.0)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_truncated_normal_init_is_the_same_eagerly_and_traced_and_compiles_once_per_size_class():
    init = torch_truncated_normal(0.1)
    key = jax.random.key(3)
    shapes = [(3, 3, 32, 64), (1, 7, 160, 160), (5, 5, 48, 64), (1, 1, 2048, 1)]
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        eager = [init(jax.random.fold_in(key, i), shape) for i, shape in enumerate(shapes)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    traced = jax.jit(lambda k: [init(jax.random.fold_in(k, i), shape) for i, shape in enumerate(shapes)])(key)
    for a, b, shape in zip(eager, traced, shapes, strict=True):
        assert a.shape == shape and a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    # 18,432, 179,200, 76,800 and 2,048 draws: four power-of-two size classes, one sampler each, and fold_in with
    # its index conversion; nothing per kernel shape (jnp's cut, reshape and scale compiled 3 programs per shape: 17).
    assert len(compiled) <= 4 + 2


def test_plain_fc_uses_torchvision_init():
    fc = _linear_head((), 1000, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert abs(np.asarray(fc.kernel[...]).std() - 0.1) < 0.001  # trunc_normal_(std=0.1), 2048 x 1000 draws
    bias = np.asarray(fc.bias[...])
    assert np.all(np.abs(bias) <= 1 / np.sqrt(2048)) and np.abs(bias).max() > 0.9 / np.sqrt(2048)


def test_shape_errors_name_what_was_expected(gray_pair, rgb_pair):
    _, gray, _ = gray_pair
    _, rgb, _ = rgb_pair
    gray.eval()
    with pytest.raises(ValueError, match="1 channel"):
        gray(jnp.zeros((2, 128, 128, 3)))
    with pytest.raises(ValueError, match="1 channel"):
        gray(jnp.zeros((2, 1, 128, 128)))  # NCHW by mistake
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        gray(jnp.zeros((128, 128, 1)))
    with pytest.raises(ValueError, match="at least 75x75"):
        gray(jnp.zeros((2, 74, 200, 1)))
    gray.train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        gray(jnp.zeros((1, 75, 75, 1)))
    gray.eval()
    rgb.train()
    with pytest.raises(ValueError, match="aux_logits in train mode needs images of at least 299x299"):
        rgb(jnp.zeros((2, 298, 299, 3)))
    rgb.eval()
    with pytest.raises(ValueError, match="transform_input"):
        Inception3(4, in_channels=1, transform_input=True, rngs=nnx.Rngs(0))


def test_train_and_eval_set_modes_everywhere(gray_pair):
    _, model, _ = gray_pair
    model.train()
    assert model.training and not model.dropout.deterministic
    assert not model.Mixed_7c.branch_pool.bn.use_running_average
    ones = jnp.ones((1, 2048))
    dropped = np.asarray(model.dropout(ones))
    assert set(np.unique(dropped)) == {0.0, 2.0}  # rate 0.5, survivors scaled by 1 / (1 - 0.5)
    model.eval()
    assert not model.training and model.dropout.deterministic
    assert model.Mixed_7c.branch_pool.bn.use_running_average
    np.testing.assert_array_equal(model.dropout(ones), ones)


@pytest.mark.slow
def test_train_mode_gradients_match_torchvision(torch):
    """Backward through every layer (max pools, pooled branches, BatchNorm on batch statistics) equals torch's.

    In float64 on both sides: at random init the train-mode backward pass amplifies rounding so much that torch's
    own float32 gradients differ from its float64 ones by 1.4 % (median over parameters, 11 % at worst; b4 1x128^2).
    """
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 1, 96, 96))
    weights = rng.normal(size=(3, 4))
    torch_model = torchvision_inception3(
        torch, images.astype(np.float32), num_outputs=4, in_channels=1, aux_logits=False, dropout=0.0
    ).double()
    torch_model.train()
    (torch_model(torch.from_numpy(images)) * torch.from_numpy(weights)).sum().backward()
    expected = {name: parameter.grad.numpy() for name, parameter in torch_model.named_parameters()}

    with jax.enable_x64(True):
        model = inception3_from_torch(torch_model.state_dict(), dropout=0.0, dtype=jnp.float64)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def weighted_sum(params):
            outputs = nnx.merge(graphdef, params, rest, copy=True)(jnp.asarray(images.transpose(0, 2, 3, 1)))
            return jnp.sum(outputs * weights)

        nnx.update(model, jax.jit(jax.grad(weighted_sum))(params))  # the model now holds d sum / d parameter
        actual = export_to_torch_state_dict(model)
    assert len(expected) == 284  # 94 convolutions and their BatchNorms (weight, bias each), fc weight and bias
    errors = {name: relative_error(actual[name].numpy(), grad) for name, grad in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2e-7, (worst, errors[worst])  # measured 1.1e-7; the README quotes this bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 10, 11, 4), (1, 16, 7, 2)])
def test_max_pool_and_its_gradient_equal_lax_reduce_window(shape, dtype):
    """The sliced 3x3/2 max pool: lax's values; its gradient routes ties to the first maximum, as lax and torch do."""
    rng = np.random.default_rng(0)
    out_shape = (shape[0], (shape[1] - 3) // 2 + 1, (shape[2] - 3) // 2 + 1, shape[3])
    pooled_grad = jnp.asarray(rng.normal(size=out_shape), dtype)
    reference = lambda x: nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")  # noqa: E731
    for values in (rng.normal(size=shape), rng.integers(0, 3, shape)):  # the second has ties in most windows
        x = jnp.asarray(values, dtype)
        expected, expected_vjp = jax.vjp(reference, x)
        actual, actual_vjp = jax.vjp(max_pool_3x3_stride_2, x)
        np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))
        np.testing.assert_allclose(
            np.asarray(actual_vjp(pooled_grad)[0], np.float32),
            np.asarray(expected_vjp(pooled_grad)[0], np.float32),
            rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
            atol=1e-6,
        )


def test_pooling_after_the_branch_convolution_is_the_same_function():
    """avg_pool(3x3, pad 1, count_include_pad) and a bias-free 1x1 convolution commute (the pool branches)."""
    layer = BasicConv2d(8, 5, 1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 8)), jnp.float32)
    expected = layer(avg_pool_3x3_same(x))
    np.testing.assert_allclose(_pooled_branch(layer, x), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_tracing_never_probes_tracer_sharding(monkeypatch):
    """`variable[...] = tracer` in flax reads tracer.sharding, whose error message walks all that was traced so far
    (quadratic tracing: 4.6 s for Inception3's train step). BatchNorm2d must assign without that probe."""
    probes = []

    def sharding(tracer):
        probes.append(type(tracer).__name__)
        raise AttributeError("sharding")

    monkeypatch.setattr(jax.core.Tracer, "sharding", property(sharding))
    bn = BatchNorm2d(4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)

    def train_mode(state, x):
        bn = nnx.merge(graphdef, state, copy=True)
        bn.train()
        return bn(x), nnx.state(bn)

    outputs, new_state = jax.jit(train_mode)(state, jnp.ones((2, 3, 3, 4)))
    assert probes == []
    assert int(new_state["num_batches_tracked"][...]) == 1
