"""jaxnets: the neural-networks lecture in JAX/Flax NNX.

From the single neuron to Inception3: activations, neurons, losses, models, data and training loops.
"""

from jaxnets import activations, losses, models, neuron

__all__ = ["activations", "losses", "models", "neuron"]
__version__ = "0.1.0"
