"""The lecture's activation functions: threshold, logistic and ReLU.

Each is a pure jax.numpy function of an array, so it works under jit, grad and vmap.
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def threshold(x: ArrayLike) -> jax.Array:
    """Heaviside step: f(x) = 1 if x >= 0 else 0.

    The lecture's first neuron fires when its weighted input reaches the threshold (here 0, the
    bias absorbing any other threshold). Its derivative is 0 everywhere except at x = 0, where it
    is undefined; JAX returns exactly 0 everywhere, so a network of threshold units cannot be
    trained by gradient descent. That is the lecture's reason for the smooth logistic below.
    """
    x = jnp.asarray(x)
    return jnp.where(x >= 0, 1.0, 0.0).astype(jnp.result_type(x, jnp.float32))


def logistic(x: ArrayLike, beta: float = 1.0) -> jax.Array:
    """Logistic (sigmoid): f(x) = 1 / (1 + exp(-beta x)).

    Derivative: f'(x) = beta f(x) (1 - f(x)). As beta grows, f approaches the threshold function.
    Computed with jax.nn.sigmoid, which never evaluates exp of a large positive number, so it stays
    finite (0 or 1) for |beta x| up to 1e4 and beyond, with no overflow warning.
    """
    return jax.nn.sigmoid(beta * jnp.asarray(x, dtype=jnp.result_type(x, jnp.float32)))


def relu(x: ArrayLike) -> jax.Array:
    """Rectified linear unit: f(x) = max(0, x).

    Derivative: 1 for x > 0, 0 for x < 0. At x = 0 the derivative is undefined; JAX's
    jax.nn.relu defines it as 0 there (as PyTorch does).
    """
    return jax.nn.relu(x)
