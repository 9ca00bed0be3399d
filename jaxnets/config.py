"""One configuration object for a run: the single source of defaults for the CLI, the library and the saved run.

`Config` is a frozen dataclass; `parser()` generates train.py's command line from its fields.
"""

import argparse
import dataclasses
import json
import os
from typing import Any, get_args, get_origin

CONFIG_FILE = "config.json"


def _option(default: Any, help: str, choices: tuple | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Defaults reproduce the lecture's sample program."""

    # Data
    dataset: str = _option("lens", "built-in 'lens' dataset, or any TFDS name (mnist, cifar10, ...)")
    data: str | None = _option(None, "a CosmoSim CSV (index,filename,...,x,y,einsteinR,...); overrides --dataset")
    image_dir: str | None = _option(None, "folder of the CSV's images (default: the CSV's folder)")
    test_data: str | None = _option(None, "a separate CosmoSim CSV for the test split")
    targets: str | None = _option(None, "comma-separated regression targets, e.g. x,y,einsteinR (default: all)")
    task: str | None = _option(
        None, "lens only: regress the parameters or classify the lens type", ("regression", "classification")
    )
    image_size: int = _option(75, "side of the built-in lens images in pixels (Inception3 needs >= 75)")
    num_train: int = _option(6400, "built-in lens dataset: training examples")
    num_validation: int = _option(1000, "built-in lens dataset: validation examples")
    num_test: int = _option(1000, "built-in lens dataset: test examples")
    data_dir: str | None = _option(None, "TFDS data folder (default ~/tensorflow_datasets)")
    standardize: bool = _option(True, "regression: train on targets standardised with the training split's mean/std")
    # Model
    model: str = _option("inception3", "the network", ("inception3", "mlp"))
    hidden: str = _option("512,256", "mlp: comma-separated hidden layer sizes")
    # The CosmoML regression head learns the lens parameters within the CPU budget; torchvision's plain fc
    # (init std 0.1, 2048 inputs, dropout 0.5) starts with outputs of std ~4 and did not learn in 1,500 steps
    # (bench/learning_curve.py, measured 2026-11-27).
    head_features: str = _option("1024,512", "inception3: head layers after the 2048 pooled features, as in "
                                 "CosmoML (2048-1024-ReLU-512-ReLU-n); '' for torchvision's plain fc")
    dropout: float = _option(0.5, "inception3: dropout before the last layer")
    aux_logits: bool = _option(False, "inception3: torchvision's auxiliary classifier (needs >= 299 px)")
    init_from: str | None = _option(None, "a PyTorch Inception3 checkpoint (.pt/.pth state_dict) to start from")
    # Optimisation
    loss: str | None = _option(None, "loss function (default: mse for regression, cross_entropy for classification)",
                               ("mse", "l1", "cross_entropy"))
    lr: float = _option(1e-3, "Adam learning rate")
    weight_decay: float = _option(0.0, "decoupled weight decay (AdamW) when > 0")
    schedule: str = _option(
        "constant", "learning-rate schedule; plateau halves it after 5 epochs without improvement",
        ("constant", "cosine", "plateau"),
    )
    epochs: int = _option(3, "number of passes over the training split")
    batch_size: int = _option(32, "global batch size (split over all devices)")
    precision: str = _option("f32", "compute precision; bf16 keeps float32 weights and loss", ("f32", "bf16"))
    seed: int = _option(0, "seed for initialisation, shuffling and dropout")
    on_nan: str = _option("stop", "on a NaN/Inf loss: stop, or skip the step's update", ("stop", "skip"))
    # Run
    workdir: str | None = _option(None, "run folder for checkpoints and reports (default runs/<dataset>-<model>)")
    distributed: bool = _option(False, "multi-host: call jax.distributed.initialize() (auto-detects Slurm)")
    compilation_cache: str = _option(".cache/jax", "persistent XLA compilation cache folder ('' to disable)")

    @property
    def dataset_name(self) -> str:
        if self.data:
            return "csv-" + os.path.splitext(os.path.basename(self.data))[0]
        return self.dataset

    @property
    def run_dir(self) -> str:
        return self.workdir or os.path.join("runs", f"{self.dataset_name}-{self.model}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, directory: str) -> None:
        """Writes config.json atomically (temp file + rename) into directory."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, directory: str) -> "Config":
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory!r}: is it a jaxnets run folder (--workdir)?")
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable jaxnets config: {error}") from None
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown}: written by another jaxnets version?")
        return cls(**values)

    def differences(self, other: "Config", fields: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for the named fields that differ."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in fields
            if getattr(self, name) != getattr(other, name)
        }


def _base_type(annotation: Any) -> type:
    """str | None -> str; int -> int."""
    if get_origin(annotation) is not None:
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --option per Config field, defaults and help taken from Config."""
    result = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(field.type)
        if kind is bool:
            result.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=field.metadata["help"])
        else:
            result.add_argument(flag, type=kind, default=field.default, choices=field.metadata["choices"],
                                help=field.metadata["help"])
    return result


def from_args(args: argparse.Namespace) -> Config:
    return Config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Config)})
