"""jaxnets: the neural-networks lecture in JAX/Flax NNX.

From the single neuron to Inception3: activations, neurons, losses, models, data and training loops.
Submodules load on first use (`jaxnets.losses`, `from jaxnets import models`), so `import jaxnets` and the
command-line tools' --help do not pay for importing JAX.
"""

import importlib

__all__ = ["activations", "losses", "models", "neuron"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"jaxnets.{name}")
    raise AttributeError(f"module 'jaxnets' has no attribute {name!r}")
