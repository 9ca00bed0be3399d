"""The lecture's single neuron: weighted input followed by an activation.

z = w . x + b, then y = f(z); both batched over any leading axes of x.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnets.activations import logistic


def weighted_input(x: ArrayLike, w: ArrayLike, b: ArrayLike) -> jax.Array:
    """z = w . x + b.

    x: [..., n] inputs (any leading batch axes); w: [n] weights; b: scalar bias. Returns z: [...].
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 1 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"weighted_input expects x [..., n] and w [n]; got x {x.shape} and w {w.shape}")
    return x @ w + b


def neuron(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike,
    activation: Callable[[jax.Array], jax.Array] = logistic,
) -> jax.Array:
    """y = activation(w . x + b), the lecture's neuron. Shapes as in weighted_input."""
    return activation(weighted_input(x, w, b))
