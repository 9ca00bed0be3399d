"""The lecture's network model: fully connected layers of neurons.

Each layer is the neuron of jaxnets.neuron applied to a whole vector: y = f(x W + b).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.activations import relu
from jaxnets.models.layers import torch_uniform


class MLP(nnx.Module):
    """Multi-layer perceptron: Linear -> activation -> ... -> Linear.

    Inputs [batch, ...] are flattened to [batch, in_features] (so images work directly);
    outputs are [batch, out_features], with no activation after the last layer (logits or
    regression values). Weights use PyTorch's nn.Linear initialisation (uniform in
    +-1/sqrt(in_features) for weights and biases), so a from-scratch run behaves like torch.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        activation: Callable[[jax.Array], jax.Array] = relu,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden_features, out_features]
        self.in_features = in_features
        self.activation = activation
        self.layers = nnx.List(
            [
                nnx.Linear(
                    n_in,
                    n_out,
                    # variance_scaling(1/3, fan_in, uniform) is torch's kaiming_uniform_(a=sqrt(5)).
                    kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                    bias_init=torch_uniform(n_in),
                    dtype=dtype,
                    rngs=rngs,
                )
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features per example; got {x.shape[1]}")
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)
