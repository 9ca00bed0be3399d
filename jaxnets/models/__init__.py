"""Flax NNX models: the lecture's network model (MLP) and its sample program's Inception3."""

from jaxnets.models.inception import Inception3
from jaxnets.models.mlp import MLP

__all__ = ["Inception3", "MLP"]
