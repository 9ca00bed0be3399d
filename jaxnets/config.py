"""One configuration object for a run: the single source of defaults for the CLI, the library and the saved run.

`Config` is a frozen dataclass; `parser()` generates train.py's command line from its fields.
"""

import argparse
import dataclasses
import json
import os
from types import UnionType
from typing import Any, Union, get_args, get_origin

CONFIG_FILE = "config.json"
# The built-in lens dataset's image side when --image-size is not given: Inception3's minimum, and the size at which
# the default run fits its CPU budget (README, "The default run").
LENS_IMAGE_SIZE = 75


def _option(default: Any, help: str, choices: tuple | None = None, *, resume: bool = False) -> Any:
    """A Config field: its default, its --help text, its choices, and whether a resumed run must keep it."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "resume": resume})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Defaults are the measured recipe of README "The default run"
    (warm-up + cosine schedule, lr 2e-3, bf16, 5 epochs, no dropout for regression; on the lens data theta as
    ellipticity x (cos, sin), weighing 2); `--schedule constant --lr 1e-3 --precision f32 --dropout 0.5
    --target-weights '' --angle-axes ''` gives the lecture's sample program."""

    # Data
    dataset: str = _option("lens", "built-in 'lens' dataset, or any TFDS name (mnist, cifar10, ...)", resume=True)
    data: tuple[str, ...] | None = _option(
        None,
        "CosmoSim output: the parameter CSV, the roulette CSV, or both comma-separated (joined on filename); "
        "overrides --dataset",
        resume=True,
    )
    simulate: str | None = _option(
        None,
        "a CosmoSim dataset TOML: generate num_train + num_validation + num_test examples with CosmoSim itself "
        "(seeded by --seed, in parallel, cached) and train on them; needs pip install 'jaxnets[cosmosim]'",
        resume=True,
    )
    image_dir: str | None = _option(None, "folder of the CSV's images (default: the CSV's folder, or its images/)")
    validation_data: tuple[str, ...] | None = _option(
        None, "CosmoSim CSV(s) for the validation split (default: 10 %% of --data's rows, seeded)", resume=True
    )
    test_data: tuple[str, ...] | None = _option(
        None, "CosmoSim CSV(s) for the test split (default: 10 %% of --data's rows, seeded)", resume=True
    )
    targets: tuple[str, ...] | None = _option(
        None,
        "comma-separated regression targets: names or patterns, e.g. 'sigma,xiX,alpha[*][*]' (default: the lens "
        "and source parameters present)",
        resume=True,
    )
    angles: tuple[str, ...] | None = _option(
        None,
        "targets that are angles, as name:period, trained as cos/sin and reported by circular error (default: "
        "theta:180,orientation:180,phi:360 for CosmoSim's degrees; the lens dataset's theta in radians, period "
        "pi); '' for none",
        resume=True,
    )
    drop_incomplete: bool = _option(
        False, "CosmoSim data: drop rows with an empty or non-numeric target cell instead of refusing them", resume=True
    )
    task: str | None = _option(
        None,
        "lens only: regress the parameters or classify the lens type",
        ("regression", "classification"),
        resume=True,
    )
    image_size: int | None = _option(
        None,
        f"image side in pixels: the lens images are rendered at it (default {LENS_IMAGE_SIZE}), CosmoSim images are "
        "resized to it on conversion (default: as stored); Inception3 needs >= 75",
        resume=True,
    )
    num_train: int = _option(6400, "built-in lens dataset and --simulate: training examples", resume=True)
    num_validation: int = _option(1000, "built-in lens dataset and --simulate: validation examples", resume=True)
    num_test: int = _option(1000, "built-in lens dataset and --simulate: test examples", resume=True)
    data_dir: str | None = _option(None, "TFDS data folder (default ~/tensorflow_datasets)")
    standardize: bool = _option(
        True, "regression: train on targets standardised with the training split's mean/std", resume=True
    )
    # At the CPU budget (10 epochs) training on moved images did not beat evaluate.py's averaging over them alone
    # (docs/cosmosim_runs.md, "Rotations and mirrors"): an option, not the default.
    augment: bool = _option(
        False,
        "regression on CosmoSim data: train on each image rotated or mirrored at random (one of the square's 8 "
        "symmetries), its targets moved with it (xiX/xiY turn, the amplitudes alpha/beta[m][s] turn by s times the "
        "angle); refused for targets without such a rule",
    )
    # On CosmoSim's images the log scale lifted 23 of 24 R² means over the group's three problems
    # (docs/cosmosim_runs.md, "Faint light on a log scale"); the lens dataset's measured recipe keeps linear.
    pixel_scale: str | None = _option(
        None,
        "how 8-bit pixel values v become the network's input: linear (v / 255) or log (log(1 + v) / log 256, which "
        "lifts faint light such as CosmoSim's lensed arcs: 1-15 of 255 become 0.125-0.5 instead of 0.004-0.059); "
        "default: log for CosmoSim data (--data, --simulate), linear otherwise",
        ("linear", "log"),
        resume=True,
    )
    # Model
    model: str = _option("inception3", "the network", ("inception3", "mlp"), resume=True)
    hidden: tuple[int, ...] = _option((512, 256), "mlp: comma-separated hidden layer sizes", resume=True)
    # The CosmoML head learns the lens parameters within the CPU budget where torchvision's plain fc did not
    # (README "The default run" and bench/learning_curve.py).
    head_features: tuple[int, ...] = _option(
        (1024, 512),
        "inception3: head layers after the 2048 pooled features, as in CosmoML "
        "(2048-1024-ReLU-512-ReLU-n); '' for torchvision's plain fc",
        resume=True,
    )
    # Dropout adds noise to the very outputs a regression fits: without it the lens run learns every target
    # within its budget on every seed measured (README "The default run").
    dropout: float | None = _option(
        None,
        "inception3: dropout before the last layer (default: 0 for regression; torchvision's 0.5 for classification)",
    )
    aux_logits: bool = _option(False, "inception3: torchvision's auxiliary classifier (needs >= 299 px)", resume=True)
    init_from: str | None = _option(
        None, "inception3: a PyTorch Inception3 checkpoint (.pt/.pth state_dict) of the same shape to start from"
    )
    fine_tune: bool = _option(
        False,
        "with --init-from: keep only its backbone (weights and BatchNorm statistics, e.g. torchvision's ImageNet "
        "inception_v3_google-*.pth), adapt its first convolution to the images' channels, and train a new head",
    )
    freeze_backbone_epochs: int = _option(
        0, "with --fine-tune: train the head alone for this many epochs first", resume=True
    )
    # Optimisation
    loss: str | None = _option(
        None,
        "loss function (default: cross_entropy for classification; for regression mse, or huber when the targets "
        "include CosmoSim's roulette amplitudes, whose heavy tails would dominate mse)",
        ("mse", "l1", "huber", "cross_entropy"),
    )
    target_weights: tuple[str, ...] | None = _option(
        None,
        "regression: loss weights of targets as name:weight (the rest weigh 1; an angle's on both its cos and sin), "
        "e.g. theta:4 (default: the lens dataset's theta:2, which is what lets theta be learned; none for other "
        "data); '' for none",
        resume=True,
    )
    angle_axes: tuple[str, ...] | None = _option(
        None,
        "regression: angles of an ellipse's axis, as angle:minor/major (targets), trained as ellipticity "
        "(1 - minor/major) times (cos, sin), so round ellipses ask for no direction (default: the lens dataset's "
        "theta:sigma2/sigma; none for other data); '' for none",
        resume=True,
    )
    amplitudes: str | None = _option(
        None,
        "regression: how CosmoSim's roulette amplitudes are trained: plain (each standardised) or polar (each pair "
        "alpha[m][s], beta[m][s] as log |(alpha, beta)| and its direction) (default: plain)",
        ("plain", "polar"),
        resume=True,
    )
    lr: float | None = _option(
        None,
        "Adam learning rate, the peak of warmup_cosine (default: 2e-3, or 1e-3 when the targets include CosmoSim's "
        "roulette amplitudes); the lecture's is 1e-3",
    )
    weight_decay: float = _option(0.0, "decoupled weight decay (AdamW) when > 0")
    ema: float = _option(
        0.0,
        "when > 0: validate, keep the best checkpoint and evaluate with an exponential moving average of the "
        "weights with this decay (e.g. 0.99: about the last 100 steps)",
        resume=True,
    )
    # On the group's three CosmoSim problems it lifted every R² mean (docs/cosmosim_runs.md, "The last layer refitted
    # by least squares", "The whole head refitted").
    refit_head: bool | None = _option(
        None,
        "regression: after the last epoch, refit the head of the best checkpoint on the features of the training "
        "images for the squared error: its last layer by least squares (for several ridges) and, for a head with "
        "hidden layers (--head-features), the whole head fine-tuned for up to 30 epochs; keep what scores the highest "
        "validation R² mean, if higher than as trained; evaluate.py uses it (its --no-refit: as trained) (default: on "
        "for CosmoSim data)",
    )
    schedule: str = _option(
        "warmup_cosine",
        "learning-rate schedule: constant (the lecture's); cosine decays it to 0 at the last step; warmup_cosine "
        "rises linearly from 0 over the first 5%% of the steps, then decays as cosine; plateau halves it after 5 "
        "epochs without improvement",
        ("constant", "cosine", "warmup_cosine", "plateau"),
    )
    epochs: int = _option(5, "number of passes over the training split")
    batch_size: int = _option(32, "global batch size (split over all devices)", resume=True)
    precision: str = _option(
        "bf16",
        "compute precision: bf16 (the default) computes in bfloat16 and keeps float32 weights and loss; f32 is "
        "the lecture's (and faster on CPUs without bfloat16 instructions, AVX512-BF16 or AMX)",
        ("f32", "bf16"),
        resume=True,
    )
    seed: int = _option(
        0, "seed for initialisation, shuffling and dropout (and for the data, unless --data-seed)", resume=True
    )
    data_seed: int | None = _option(
        None,
        "seed of the data itself: the built-in lens images, --simulate's CosmoSim draws and the seeded split of CSV "
        "and TFDS data into train/validation/test (default: --seed); fix it to compare seeds on the same images",
        resume=True,
    )
    on_nan: str = _option("stop", "on a NaN/Inf loss: stop, or skip the step's update", ("stop", "skip"), resume=True)
    read_threads: int = _option(
        2,
        "threads reading and preparing examples ahead of the train step (raise it if "
        "train.py warns that the step waits on data)",
    )
    # Run
    workdir: str | None = _option(None, "run folder for checkpoints and reports (default runs/<dataset>-<model>)")
    distributed: bool = _option(False, "multi-host: call jax.distributed.initialize() (auto-detects Slurm)")
    compilation_cache: str = _option(
        ".cache/jax", "persistent XLA compilation cache folder, also keeping the traced train steps ('' to disable)"
    )

    @property
    def dataset_name(self) -> str:
        if self.simulate:
            return "sim-" + os.path.splitext(os.path.basename(self.simulate))[0]
        if self.data:
            return "csv-" + os.path.splitext(os.path.basename(self.data[0]))[0]
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
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown}: written by another jaxnets version?")
        if "angles" not in values:
            values["angles"] = []  # saved before angles existed: its targets were all trained as plain numbers
        if "target_weights" not in values:
            values["target_weights"] = []  # saved before target weights existed: every target weighed 1
        if "angle_axes" not in values:
            values["angle_axes"] = []  # saved before angle axes existed: angles as plain (cos, sin)
        if "pixel_scale" not in values:
            values["pixel_scale"] = "linear"  # saved before the pixel scale existed: pixels as v / 255
        try:
            return cls(**{name: _from_json(fields[name].type, value) for name, value in values.items()})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def resume_fields(cls) -> tuple[str, ...]:
        """The fields a resumed run must share with the saved one (the rest, e.g. epochs or lr, may change)."""
        return tuple(field.name for field in dataclasses.fields(cls) if field.metadata["resume"])

    def differences(self, other: "Config", fields: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for the named fields that differ."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in fields
            if getattr(self, name) != getattr(other, name)
        }


def _item_type(annotation: Any) -> type | None:
    """tuple[int, ...] | None -> int; any annotation that is not a tuple -> None."""
    base = _base_type(annotation)
    return get_args(base)[0] if get_origin(base) is tuple else None


def _from_json(annotation: Any, value: Any) -> Any:
    """A config.json value as the field holds it: JSON lists (or the comma strings that earlier versions
    saved) become tuples."""
    item = _item_type(annotation)
    if item is None or value is None:
        return value
    return parse_list(value, item) if isinstance(value, str) else tuple(item(v) for v in value)


def parse_list(text: str, item: type = str) -> tuple:
    """'512, 256' -> (512, 256) for item=int; '' -> (). Raises ValueError naming a bad entry."""
    values = []
    for part in text.split(","):
        if part.strip():
            try:
                values.append(item(part.strip()))
            except ValueError:
                raise ValueError(f"{part.strip()!r} in {text!r} is not a valid {item.__name__}") from None
    return tuple(values)


def format_value(value: Any) -> str:
    """A field's value as the command line writes it: (512, 256) -> '512,256', () -> "''" (none)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "''"
    return repr(value)


def _base_type(annotation: Any) -> type:
    """str | None -> str; tuple[int, ...] | None -> tuple[int, ...]; int -> int."""
    if get_origin(annotation) in (Union, UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --option per Config field, defaults and help taken from Config.

    Tuple fields are typed once here: `--hidden 512,256` gives (512, 256).
    """
    result = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind, item = _base_type(field.type), _item_type(field.type)
        if kind is bool:
            result.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=field.metadata["help"]
            )
        elif item is not None:
            # A string default is parsed by `type` too, and --help shows it as the user types it.
            default = None if field.default is None else ",".join(map(str, field.default))
            result.add_argument(flag, type=_list_argument(item), default=default, help=field.metadata["help"])
        else:
            result.add_argument(
                flag, type=kind, default=field.default, choices=field.metadata["choices"], help=field.metadata["help"]
            )
    return result


def _list_argument(item: type):
    def convert(text: str) -> tuple:
        try:
            return parse_list(text, item)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = f"comma-separated {item.__name__} list"  # argparse names the type in its error
    return convert


def from_args(args: argparse.Namespace) -> Config:
    return Config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Config)})
