import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import activations
from jaxnets.neuron import neuron, weighted_input


def test_weighted_input_closed_form():
    x = jnp.array([1.0, 2.0, 3.0])
    w = jnp.array([0.5, -1.0, 2.0])
    assert float(weighted_input(x, w, 0.25)) == pytest.approx(0.5 - 2.0 + 6.0 + 0.25)


def test_weighted_input_batched_over_leading_axes():
    x = jnp.arange(24.0).reshape(2, 4, 3)
    w = jnp.array([1.0, 0.0, -1.0])
    z = weighted_input(x, w, 1.0)
    assert z.shape == (2, 4)
    np.testing.assert_allclose(z, x[..., 0] - x[..., 2] + 1.0)


def test_neuron_default_is_logistic_and_gradient():
    x = jnp.array([[1.0, -1.0]])
    w = jnp.array([2.0, 1.0])
    y = neuron(x, w, 0.0)
    np.testing.assert_allclose(y, [1 / (1 + np.exp(-1.0))], rtol=1e-6)
    # dy/dw = f(z)(1 - f(z)) x
    grad_w = jax.grad(lambda w: neuron(x, w, 0.0).sum())(w)
    f = float(y[0])
    np.testing.assert_allclose(grad_w, f * (1 - f) * np.array([1.0, -1.0]), rtol=1e-6)


def test_threshold_neuron_has_zero_gradient():
    x = jnp.array([[0.3, -0.2], [1.0, 2.0]])
    grad_w = jax.grad(lambda w: neuron(x, w, 0.1, activations.threshold).sum())(jnp.ones(2))
    np.testing.assert_array_equal(grad_w, [0.0, 0.0])


def test_weighted_input_shape_error():
    with pytest.raises(ValueError, match=r"x \(2, 3\) and w \(4,\)"):
        weighted_input(jnp.ones((2, 3)), jnp.ones(4), 0.0)
