"""torchvision Inception3 weights into jaxnets' Inception3 and back: state_dict import, checkpoint reading, export.

torch is imported only inside the functions that need it: it is a test/interop dependency, not a runtime one.
"""

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.models.inception import Inception3

# Our variable name -> torch's. Kernels change layout too: conv OIHW <-> HWIO, Linear [out, in] <-> [in, out].
_TORCH_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
_TORCH_ORDER = ("kernel", "scale", "bias", "mean", "var", "num_batches_tracked")  # torch's order in a layer
# Written by torch in train mode but never read (momentum is set): a state_dict without it is still complete.
_OPTIONAL = "num_batches_tracked"


def inception3_from_torch(state_dict: Mapping[str, Any], **model_kwargs: Any) -> Inception3:
    """Build an Inception3 holding the weights and BatchNorm running statistics of a torchvision state_dict.

    state_dict: names -> torch tensors or numpy arrays, from torchvision's Inception3 or a variant with another
    first convolution (in_channels), fc size (num_outputs) or an nn.Sequential head fc.0/fc.2/... (head_features).
    in_channels, num_outputs, aux_logits and head_features are read from the keys and shapes; model_kwargs
    (dropout, transform_input, dtype, rngs for dropout, or any of those four) override them. Unknown, missing
    or mis-shaped keys raise ValueError listing them all; nothing is skipped. The model is returned in train
    mode, like a fresh torch module: call model.eval() for inference.
    """
    arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
    kwargs = {**_infer_model_kwargs(arrays), **model_kwargs}
    rngs = kwargs.pop("rngs", None)
    # Shapes only: every weight is overwritten below, so skip the random init (seconds on a CPU).
    model = nnx.eval_shape(lambda: Inception3(**kwargs, rngs=nnx.Rngs(0)))
    variables = _torch_named_variables(model)

    _check_fit(arrays, variables, f"state_dict does not fit Inception3({_describe(kwargs)})", unknown=True)
    _copy_into(variables, arrays)
    # eval_shape left the dropout stream abstract too: give it a real key.
    nnx.reseed(model, default=rngs.dropout() if rngs is not None else 0)
    return model


# The layers a fine-tuned model gets new: the classifier and the auxiliary classifier's last layer.
HEAD_PREFIXES = ("fc.", "AuxLogits.fc.")
_FIRST_CONV = "Conv2d_1a_3x3.conv.weight"


def inception3_for_fine_tuning(
    state_dict: Mapping[str, Any], num_outputs: int, *, in_channels: int, rngs: nnx.Rngs, **model_kwargs: Any
) -> Inception3:
    """A new Inception3 for num_outputs outputs on in_channels-channel images, whose backbone is a torchvision
    Inception3's: torchvision's ImageNet file (inception_v3_google-*.pth: 3 channels, 1,000 classes, aux head) or
    any variant.

    Every backbone weight and BatchNorm running statistic is copied unchanged, the first convolution adapted to
    in_channels by adapt_input_conv; the head (fc, and AuxLogits.fc when aux_logits) is freshly initialised from
    rngs with model_kwargs' head_features. The state_dict's own head, and its AuxLogits when the new model has
    none, are not used. Missing or mis-shaped backbone keys raise ValueError listing them all.
    """
    arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
    if _FIRST_CONV in arrays:
        arrays[_FIRST_CONV] = adapt_input_conv(arrays[_FIRST_CONV], in_channels)
    model = Inception3(num_outputs, in_channels=in_channels, **model_kwargs, rngs=rngs)
    backbone = {
        name: variable for name, variable in _torch_named_variables(model).items() if not name.startswith(HEAD_PREFIXES)
    }
    _check_fit(arrays, backbone, "state_dict has no Inception3 backbone to fine-tune", unknown=False)
    _copy_into(backbone, arrays)
    return model


def _check_fit(arrays: Mapping[str, np.ndarray], variables: Mapping[str, nnx.Variable], title: str, *, unknown: bool):
    """Raises ValueError titled `title` listing every missing, mis-shaped (and, if `unknown`, unused) key."""
    extra = sorted(set(arrays) - set(variables)) if unknown else []
    missing = [name for name in variables if name not in arrays and not name.endswith(_OPTIONAL)]
    misshaped = [
        f"{name}: {arrays[name].shape}, expected {_torch_shape(variable)}"
        for name, variable in variables.items()
        if name in arrays and arrays[name].shape != _torch_shape(variable)
    ]
    problems = [
        f"{kind} ({len(names)}): " + ", ".join(names)
        for kind, names in [("unknown keys", extra), ("missing keys", missing), ("mis-shaped", misshaped)]
        if names
    ]
    if problems:
        raise ValueError(f"{title}:\n  " + "\n  ".join(problems))


def _copy_into(variables: Mapping[str, nnx.Variable], arrays: Mapping[str, np.ndarray]) -> None:
    """Sets each variable from its torch-layout array (zeros for an absent optional one, num_batches_tracked)."""
    for name, variable in variables.items():
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        value = _from_torch_layout(arrays[name]) if name in arrays else np.zeros(shape)
        # jnp.array copies: on CPU jnp.asarray may alias the host buffer, which torch (running statistics) or
        # the caller may later change in place.
        variable.set_value(jnp.array(value, dtype))


def adapt_input_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A first-convolution weight [out, 3, kh, kw] trained on RGB images, for images with in_channels channels.

    Grey (1): the sum of the three kernels, so a grey image gives what the RGB network gave for (g, g, g).
    Others: the RGB kernels repeated cyclically and scaled by 3 / in_channels (timm's adapt_input_conv).
    A weight that already takes in_channels is returned as it is.
    """
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if have != 3:
        raise ValueError(
            f"the first convolution takes {have}-channel images; only an RGB (3-channel) one can be adapted to "
            f"{in_channels} channels"
        )
    if in_channels == 1:
        return weight.sum(axis=1, keepdims=True)
    repeated = np.tile(weight, (1, -(-in_channels // 3), 1, 1))[:, :in_channels]
    return repeated * np.asarray(3 / in_channels, weight.dtype)


def state_dict_in_channels(state_dict: Mapping[str, Any]) -> int | None:
    """The channel count an Inception3 state_dict's first convolution takes (None when it has none)."""
    weight = state_dict.get(_FIRST_CONV)
    return None if weight is None or len(weight.shape) != 4 else int(weight.shape[1])


def export_to_torch_state_dict(model: Inception3) -> dict[str, Any]:
    """The inverse of inception3_from_torch: a state_dict torchvision's Inception3 (same variant) loads strictly.

    Values are torch tensors when torch is importable (so `torch_model.load_state_dict(...)` works directly),
    numpy arrays otherwise. Keys are sorted by module (torch matches by name, not position).
    """
    # Own, contiguous copies: a view of a JAX buffer dies with it (a donating train step frees it).
    arrays = {
        name: np.array(_to_torch_layout(np.asarray(variable.get_value())), order="C")
        for name, variable in _torch_named_variables(model).items()
    }
    for name in arrays:
        if name.endswith(_OPTIONAL):
            arrays[name] = arrays[name].astype(np.int64)  # torch keeps the counter as int64
    try:
        import torch
    except ImportError:
        return arrays
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def load_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch .pt/.pth file's state_dict as numpy arrays, without ever running arbitrary pickled code.

    Accepts a bare state_dict or a dict holding one under "state_dict" or "model" (training checkpoints), and
    strips the "module." prefix nn.DataParallel adds. Uses torch.load(weights_only=True): a file holding whole
    pickled objects (torch.save(model)) or no state_dict raises ValueError saying so.
    """
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} could not be read as tensors only (torch.load(weights_only=True)). If it was saved with "
            "torch.save(model), save model.state_dict() instead: unpickling whole objects could run arbitrary "
            f"code. torch said: {str(error).splitlines()[0]}"
        ) from error
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(name, str) and torch.is_tensor(value) for name, value in loaded.items())
    ):
        found = type(loaded).__name__
        if isinstance(loaded, Mapping):
            found += " with keys " + ", ".join(map(str, list(loaded)[:8])) + (", ..." if len(loaded) > 8 else "")
        raise ValueError(
            f"{path} holds no state_dict (a dict of names to tensors, bare or under 'state_dict'/'model'); "
            f"found a {found}"
        )
    if all(name.startswith("module.") for name in loaded):
        loaded = {name.removeprefix("module."): value for name, value in loaded.items()}
    return {name: _to_numpy(value) for name, value in loaded.items()}


def _infer_model_kwargs(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """in_channels, num_outputs, aux_logits and head_features that a state_dict's keys and shapes imply."""
    kwargs: dict[str, Any] = {"aux_logits": any(name.startswith("AuxLogits.") for name in arrays)}
    first_conv = arrays.get("Conv2d_1a_3x3.conv.weight")
    if first_conv is not None and first_conv.ndim == 4:
        kwargs["in_channels"] = first_conv.shape[1]
    if "fc.weight" in arrays:
        kwargs["num_outputs"] = arrays["fc.weight"].shape[0]
        return kwargs
    # An nn.Sequential head (Linear, ReLU, Linear, ReLU, ..., Linear) numbers its Linear layers 0, 2, 4, ...
    layers = sorted(int(match[1]) for name in arrays if (match := re.fullmatch(r"fc\.(\d+)\.weight", name)))
    if not layers:
        raise ValueError(
            "state_dict has neither fc.weight nor fc.0.weight: not an Inception3 state_dict? "
            f"First keys: {', '.join(list(arrays)[:5])}"
        )
    if layers != list(range(0, 2 * len(layers), 2)):
        raise ValueError(
            f"fc head layers at indices {layers}; expected nn.Sequential(Linear, ReLU, Linear, ..., Linear) "
            "with Linear layers at 0, 2, 4, ..."
        )
    widths = [arrays[f"fc.{index}.weight"].shape[0] for index in layers]
    kwargs["head_features"], kwargs["num_outputs"] = tuple(widths[:-1]), widths[-1]
    return kwargs


def _torch_named_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """torch state_dict name -> our Param/BatchStat: modules sorted by name, a layer's entries in torch's order."""
    graph = list(nnx.iter_graph(model))
    sequentials = {path for path, node in graph if isinstance(node, nnx.Sequential)}
    named = []
    for path, node in graph:
        if not isinstance(node, (nnx.Param, nnx.BatchStat)):
            continue
        # torch's nn.Sequential numbers its children directly: fc.0.weight, where NNX has fc.layers.0.kernel.
        parts = [str(part) for i, part in enumerate(path) if not (part == "layers" and path[:i] in sequentials)]
        parts[-1] = _TORCH_NAMES[parts[-1]]
        named.append(((tuple(parts[:-1]), _TORCH_ORDER.index(path[-1])), ".".join(parts), node))
    return {name: variable for _, name, variable in sorted(named, key=lambda entry: entry[0])}


def _torch_shape(variable: nnx.Variable) -> tuple[int, ...]:
    shape = tuple(variable.get_value().shape)
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    """torch conv weight [out, in, kh, kw] -> [kh, kw, in, out]; Linear weight [out, in] -> [in, out]."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    """Our conv kernel [kh, kw, in, out] -> [out, in, kh, kw]; Linear kernel [in, out] -> [out, in]."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, bfloat16 included) or array-like as a numpy array, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _describe(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in kwargs.items())
