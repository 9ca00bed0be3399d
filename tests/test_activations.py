import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import activations


def test_threshold_values_and_zero_gradient():
    x = jnp.array([-2.0, -1e-6, 0.0, 1e-6, 3.0])
    np.testing.assert_array_equal(activations.threshold(x), [0, 0, 1, 1, 1])
    gradient = jax.vmap(jax.grad(activations.threshold))(x)
    np.testing.assert_array_equal(gradient, np.zeros(5))


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_logistic_closed_form_and_derivative(beta):
    x = jnp.linspace(-5, 5, 11)
    f = activations.logistic(x, beta)
    np.testing.assert_allclose(f, 1 / (1 + np.exp(-beta * np.asarray(x))), rtol=1e-6)
    derivative = jax.vmap(jax.grad(lambda v: activations.logistic(v, beta)))(x)
    np.testing.assert_allclose(derivative, beta * f * (1 - f), rtol=1e-5, atol=1e-7)


def test_logistic_finite_at_extremes_without_warnings():
    x = jnp.array([-1e4, -1e3, 0.0, 1e3, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = activations.logistic(x)
        g = jax.vmap(jax.grad(activations.logistic))(x)
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(f, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_large_beta_approaches_threshold():
    x = jnp.array([-0.5, -0.1, 0.1, 0.5])
    np.testing.assert_allclose(activations.logistic(x, beta=1e3), activations.threshold(x), atol=1e-6)


def test_relu_values_and_gradient_at_zero():
    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(activations.relu(x), [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(jax.vmap(jax.grad(activations.relu))(x), [0.0, 0.0, 1.0])


def test_activations_jit_and_vmap():
    x = jnp.arange(-3.0, 3.0).reshape(2, 3)
    for f in (activations.threshold, activations.logistic, activations.relu):
        np.testing.assert_array_equal(jax.jit(f)(x), jax.vmap(f)(x))
