import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnets import activations
from jaxnets.models import MLP


def test_shapes_and_flattening():
    model = MLP(12, [8, 4], 3, rngs=nnx.Rngs(0))
    assert model(jnp.ones((5, 2, 2, 3))).shape == (5, 3)


def test_wrong_feature_count_is_explained():
    model = MLP(12, [8], 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expects 12 input features.*got 10"):
        model(jnp.ones((5, 10)))


def test_init_follows_torch_linear_bounds():
    model = MLP(400, [300], 2, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.layers[0].kernel[...])
    bias = np.asarray(model.layers[0].bias[...])
    bound = 1 / np.sqrt(400)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert np.abs(bias).max() <= bound and np.abs(bias).std() > 0


@pytest.mark.parametrize("activation, torch_name", [(activations.relu, "ReLU"), (activations.logistic, "Sigmoid")])
def test_same_outputs_as_torch_sequential(torch, activation, torch_name):
    model = MLP(6, [5, 4], 3, activation=activation, rngs=nnx.Rngs(0))
    torch_layers = []
    for i, layer in enumerate(model.layers):
        linear = torch.nn.Linear(*layer.kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(layer.kernel[...]).T))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
        torch_layers.append(linear)
        if i < len(model.layers) - 1:
            torch_layers.append(getattr(torch.nn, torch_name)())
    torch_model = torch.nn.Sequential(*torch_layers)
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
