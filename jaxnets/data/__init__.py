"""Datasets: the built-in `lens` simulation, CosmoSim CSV+image folders and any TFDS dataset by name.

`load_dataset` returns a `Dataset` of random-access splits; `jaxnets.data.pipeline.batches` feeds them to training.

    load_dataset("lens")                          built once into the TFDS data dir, then reused
    load_dataset(data="runs/cosmosim/train.csv")  converted once to an ArrayRecord dataset, then reused
    load_dataset("mnist")                         any TFDS catalog dataset with `image` and `label` features

All three are stored as TFDS ArrayRecord files and read with `tfds.data_source`: no TensorFlow needed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxnets.config import LENS_IMAGE_SIZE, Config
from jaxnets.data import cosmosim, lens
from jaxnets.data.targets import COSMOSIM_ANGLES, Polar, TargetEncoding, parse_angles

DEFAULTS = Config()  # the one source of defaults, shared with train.py's command line
TASKS = ("regression", "classification")
SPLITS = ("train", "validation", "test")
INSTALL_TF = "pip install 'jaxnets[tf]'"


class Examples:
    """One split as a random-access sequence of plain examples, whatever the stored feature names.

    examples[i] = {"image": uint8 [H, W, C], "target": float32 [P] (regression) or "label": int32
    (classification), "index": i, "mask": 1.0}; `index` and `mask` let the pipeline track padding.
    `indices` views a subset of `source` (e.g. a validation split carved out of train).
    """

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        *,
        image_key: str = "image",
        target_key: str | None = None,
        columns: Sequence[int] | None = None,
        label_key: str | None = None,
        indices: np.ndarray | None = None,
    ):
        if (target_key is None) == (label_key is None):
            raise ValueError("Examples needs exactly one of target_key (regression) or label_key (classification)")
        self.source = source
        self.image_key = image_key
        self.target_key = target_key
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.label_key = label_key
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __repr__(self) -> str:
        return f"Examples({len(self)} {self.task} examples)"

    @property
    def task(self) -> str:
        return "regression" if self.target_key is not None else "classification"

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def _convert(self, index: int, raw: Mapping[str, Any]) -> dict[str, Any]:
        image = np.asarray(raw[self.image_key], dtype=np.uint8)
        if image.ndim == 2:  # some TFDS datasets store grayscale as [H, W]
            image = image[:, :, None]
        example: dict[str, Any] = {"image": image, "index": np.int32(index), "mask": np.float32(1.0)}
        if self.target_key is not None:
            target = np.asarray(raw[self.target_key], dtype=np.float32).reshape(-1)
            example["target"] = target if self.columns is None else target[self.columns]
        else:
            example["label"] = np.int32(raw[self.label_key])
        return example

    def _source_index(self, index: int) -> int:
        return int(index) if self.indices is None else int(self.indices[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for a split of {len(self)}")
        return self._convert(index, self.source[self._source_index(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # TFDS sources read a list of records in one call, cheaper than one call per record.
        raw = (
            self.source.__getitems__([self._source_index(i) for i in indices])
            if hasattr(self.source, "__getitems__")
            else [self.source[self._source_index(i)] for i in indices]
        )
        return [self._convert(int(i), r) for i, r in zip(indices, raw, strict=True)]

    def identifiers(self, key: str = "filename", chunk: int = 256) -> list[str] | None:
        """Each example's own name in the dataset it came from (`filename` of CosmoSim CSV and simulated
        data), in split order; None when the stored examples have none (the built-in lens data, TFDS sets)."""
        if len(self) == 0 or key not in self.source[self._source_index(0)]:
            return None
        names = []
        for start in range(0, len(self), chunk):
            indices = [self._source_index(i) for i in range(start, min(start + chunk, len(self)))]
            raw = (
                self.source.__getitems__(indices)
                if hasattr(self.source, "__getitems__")
                else [self.source[i] for i in indices]
            )
            names += [r[key].decode() if isinstance(r[key], bytes) else str(r[key]) for r in raw]
        return names

    def targets(self, chunk: int = 256) -> np.ndarray:
        """All regression targets of the split: float32 [N, P]."""
        if self.target_key is None:
            raise ValueError("targets() is for regression splits; this split has class labels")
        rows = [
            example["target"]
            for start in range(0, len(self), chunk)
            for example in self.__getitems__(range(start, min(start + chunk, len(self))))
        ]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset: its splits and what the model needs to know about them.

    name: "lens", "mnist", ... or "csv:<stem>"; task: "regression" or "classification";
    angles: regression targets that are angles, name -> period (in the target's unit);
    splits: split name -> `Examples` (len, __getitem__); image_shape: (H, W, C);
    target_names: regression parameter names, or class names for classification;
    num_classes: classification only; directory: where the ArrayRecord files are (None if unknown);
    metadata: what was recorded with the data (e.g. the seeded CSV split).
    """

    name: str
    task: str
    splits: Mapping[str, Any]
    image_shape: tuple[int, int, int]
    target_names: tuple[str, ...]
    num_classes: int | None = None
    directory: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    angles: Mapping[str, float] = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def target_encoding(
        self,
        *,
        standardize: bool = True,
        weights: Mapping[str, float] | None = None,
        axis_ratios: Mapping[str, tuple[str, str]] | None = None,
        polar: Sequence[Polar] = (),
    ) -> TargetEncoding:
        """How the targets are trained: angles (self.angles, name -> period) as cos/sin pairs (times their
        ellipse's ellipticity for those in axis_ratios), the amplitude pairs in polar in polar form, every column
        standardised with the train split's statistics when standardize is True, and weighted targets' columns
        scaled by sqrt(weight) (TargetEncoding.fit)."""
        if self.task != "regression":
            raise ValueError(f"target_encoding() is for regression; {self.name} is a {self.task} dataset")
        train = self._train_targets("target_encoding()") if standardize else None
        return TargetEncoding.fit(
            self.target_names,
            self.angles,
            train,
            standardize=standardize,
            weights=weights,
            axis_ratios=axis_ratios,
            polar=polar,
        )

    def target_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-target mean and standard deviation over the train split: float32 [P] each (angles as plain numbers).

        A constant target gets std 1 so that standardising it cannot divide by zero.
        """
        if self.task != "regression":
            raise ValueError(f"target_stats() is for regression; {self.name} is a {self.task} dataset")
        plain = TargetEncoding.fit(self.target_names, {}, self._train_targets("target_stats()"), standardize=True)
        return plain.mean.copy(), plain.std.copy()

    def _train_targets(self, caller: str) -> np.ndarray:
        """The train split's targets [N, P], read once (reading decodes every example)."""
        if "train_targets" not in self._cache:
            if "train" not in self.splits or len(self.splits["train"]) == 0:
                raise ValueError(f"{self.name}: {caller} needs a non-empty train split")
            self._cache["train_targets"] = self.splits["train"].targets()
        return self._cache["train_targets"]


def load_dataset(
    dataset: str = DEFAULTS.dataset,
    *,
    data: str | Sequence[str] | None = None,
    simulate: str | None = None,
    image_dir: str | None = None,
    validation_data: str | Sequence[str] | None = None,
    test_data: str | Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    angles: Sequence[str] | None = None,
    drop_incomplete: bool = DEFAULTS.drop_incomplete,
    image_size: int | None = DEFAULTS.image_size,
    num_train: int = DEFAULTS.num_train,
    num_validation: int = DEFAULTS.num_validation,
    num_test: int = DEFAULTS.num_test,
    task: str | None = None,
    data_dir: str | None = None,
    seed: int = DEFAULTS.seed,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Dataset:
    """Loads (building or converting once if needed) one of the three kinds of dataset.

    dataset: "lens" (built-in simulation), "csv" (or leave "lens" and give `data`), or a TFDS name ("mnist").
    data: CosmoSim CSV file(s): a parameter file, a roulette file, or both (joined on `filename`);
      simulate: a CosmoSim dataset TOML: num_train + num_validation + num_test examples are generated with
      CosmoSim (seeded, cached under data_dir) and loaded as their two CSVs;
      validation_data / test_data: the same for pre-split files (default: seeded fractions of data's rows);
      image_dir: the folder the CSV's filenames are relative to (default: the CSV's folder or its images/).
    targets: regression targets by name (lens and CSV; CSV also aliases and patterns such as `alpha[*][*]`);
      default all parameters present. drop_incomplete: CSV rows with an empty target cell are dropped.
    angles: targets that are angles, as "name:period" (CSV default: theta:180, orientation:180, phi:360 in
      degrees; the lens dataset's theta is in radians with period pi); () for none.
    image_size: the lens images' side (default 75), or the side CSV images are resized to (default: as stored).
    num_train, num_validation, num_test: the lens dataset's size (each combination is its own cache).
    task: lens only: "regression" (params) or "classification" (SIS vs point mass); default regression.
    data_dir: the TFDS data dir (default ~/tensorflow_datasets or $TFDS_DATA_DIR).
    seed: lens generation seed; the seeded split of a CSV or of a TFDS train set into train/validation.
    validation_fraction, test_fraction: the share of a CSV (or of a TFDS train split, validation only)
      held out, when the data has no such split of its own.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if simulate is not None:
        if data is not None or validation_data is not None or test_data is not None or image_dir is not None:
            raise ValueError(
                "simulate= makes the data: it cannot be combined with data=, validation_data=, test_data= or image_dir="
            )
        data, validation_fraction, test_fraction = _simulate(
            simulate, num_train, num_validation, num_test, seed, data_dir
        )
    if data is not None or dataset == "csv":
        if dataset not in ("lens", "csv"):
            raise ValueError(f"data= names a CSV dataset; it cannot be combined with dataset={dataset!r}")
        if data is None:
            raise ValueError("dataset='csv' needs data='path/to/dataset.csv'")
        if task not in (None, "regression"):
            raise ValueError("CSV datasets are regression datasets: task must be 'regression'")
        builder = cosmosim.build(
            data,
            image_dir=image_dir,
            validation_data=validation_data,
            test_data=test_data,
            targets=targets,
            angles=parse_angles(COSMOSIM_ANGLES if angles is None else angles),
            drop_incomplete=drop_incomplete,
            image_size=image_size,
            data_dir=data_dir,
            seed=seed,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
        )
        return _from_csv_builder(builder)
    if image_dir is not None or test_data is not None or validation_data is not None:
        raise ValueError("image_dir=, validation_data= and test_data= apply only to CSV datasets (data=...)")
    if dataset == "lens":
        lens_angles = {"theta": math.pi} if angles is None else parse_angles(angles)
        return _load_lens(
            task or "regression",
            targets,
            lens_angles,
            image_size or LENS_IMAGE_SIZE,
            num_train,
            num_validation,
            num_test,
            seed,
            data_dir,
        )
    if task not in (None, "classification"):
        raise ValueError(f"TFDS datasets by name are classification datasets (image, label); got task={task!r}")
    if targets is not None:
        raise ValueError(f"targets= applies to regression datasets; {dataset!r} is loaded for classification")
    return _load_named(dataset, data_dir=data_dir, seed=seed, validation_fraction=validation_fraction)


def _select_targets(targets: Sequence[str] | None, available: Sequence[str], dataset: str) -> list[int]:
    if targets is None:
        return list(range(len(available)))
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in available]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(
            f"{dataset}: targets must be distinct names from {tuple(available)}, got {tuple(targets)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [list(available).index(t) for t in targets]


def _simulate(toml: str, num_train: int, num_validation: int, num_test: int, seed: int, data_dir: str | None):
    """Runs CosmoSim (or finds its cached output) for all three splits; returns (its two CSVs, the validation and
    test fractions that split them into those sizes)."""
    from jaxnets.data import simulate as simulate_lib

    total = num_train + num_validation + num_test
    if num_train < 1 or num_validation < 0 or num_test < 0:
        raise ValueError(
            f"simulate: num_train must be >= 1 and the other splits >= 0, got {num_train}, {num_validation}, {num_test}"
        )
    root = data_dir or tfds.core.constants.get_default_data_dir()
    try:
        files = simulate_lib.simulate(toml, total, simulate_lib.cache_directory(root, toml, total, seed), seed=seed)
    except ImportError as error:
        raise ValueError(str(error)) from None
    return (str(files.params_csv), str(files.roulette_csv)), num_validation / total, num_test / total


def _load_lens(task: str, targets, angles, image_size, num_train, num_validation, num_test, seed, data_dir) -> Dataset:
    if num_train < 1:
        raise ValueError(f"lens dataset: num_train must be at least 1, got {num_train}")
    builder = lens.build(image_size, num_train, num_validation, num_test, seed, data_dir=data_dir)
    sources = builder.as_data_source()
    metadata = {"config": builder.builder_config.name, "param_names": list(lens.PARAM_NAMES)}
    shape = (image_size, image_size, 1)
    if task == "classification":
        if targets is not None:
            raise ValueError("targets= applies to lens regression; classification predicts the lens type")
        splits = {name: Examples(src, label_key="lens") for name, src in sources.items()}
        return Dataset(
            "lens", task, splits, shape, lens.LENS_NAMES, len(lens.LENS_NAMES), str(builder.data_dir), metadata
        )
    columns = _select_targets(targets, lens.PARAM_NAMES, "lens")
    names = tuple(lens.PARAM_NAMES[c] for c in columns)
    splits = {name: Examples(src, target_key="params", columns=columns) for name, src in sources.items()}
    chosen_angles = {name: period for name, period in angles.items() if name in names}
    return Dataset("lens", task, splits, shape, names, None, str(builder.data_dir), metadata, chosen_angles)


def _from_csv_builder(builder) -> Dataset:
    metadata = dict(builder.info.metadata or {})
    for note in metadata.get("notes") or ():
        warnings.warn(note, stacklevel=3)
    target_names = tuple(metadata["target_names"])
    splits = {name: Examples(src, target_key="target") for name, src in builder.as_data_source().items()}
    shape = tuple(int(d) for d in builder.info.features["image"].shape)
    angles = {name: float(period) for name, period in (metadata.get("angles") or {}).items()}
    return Dataset(
        f"csv:{metadata['stem']}",
        "regression",
        splits,
        shape,
        target_names,
        None,
        str(builder.data_dir),
        metadata,
        angles,
    )


def _missing_module(error: BaseException) -> str | None:
    """The top-level module whose import failed somewhere in the exception chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError):
            name = error.name or ""
            if not name and "No module named" in str(error):
                name = str(error).split("No module named", 1)[1].strip(" '\"")
            if name:
                return name.split(".")[0]
        error = error.__cause__ or error.__context__
    return None


def _data_source(name: str, data_dir: str | None, split: str | None = None):
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {name!r}: use 'lens', a CosmoSim CSV (data='file.csv') or a "
            "TFDS catalog name such as 'mnist', 'fashion_mnist' or 'cifar10'"
        ) from None
    except Exception as error:
        module = _missing_module(error)
        if module == "tensorflow":
            raise ImportError(
                f"preparing the TFDS dataset {name!r} needs TensorFlow (TFDS encodes its images "
                f"with it); install it with: {INSTALL_TF}"
            ) from error
        if module == "importlib_resources":
            # TFDS imports this backport unconditionally when it prepares a catalog dataset.
            raise ImportError(
                f"preparing the TFDS dataset {name!r} needs the `importlib_resources` package: "
                "pip install importlib_resources"
            ) from error
        raise


def _load_named(name: str, *, data_dir: str | None, seed: int, validation_fraction: float) -> Dataset:
    sources = dict(_data_source(name, data_dir))
    if not sources:
        # TFDS reports no splits when it has only the feature spec (tfds.testing.mock_data does this):
        # fall back to the usual train/test pair.
        sources = {split: _data_source(name, data_dir, split) for split in ("train", "test")}
    info = next(iter(sources.values())).dataset_info
    features = info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
        raise ValueError(f"{name}: expected `image` and a class `label` feature, found {sorted(features.keys())}")
    shape = tuple(features["image"].shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or any(d is None for d in shape):
        raise ValueError(f"{name}: images must have one fixed shape (H, W, C), got {shape}")
    splits = {split: Examples(src, label_key="label") for split, src in sources.items() if split in SPLITS}
    metadata: dict[str, Any] = {"tfds_name": info.full_name if hasattr(info, "full_name") else name}
    if "validation" not in splits and "train" in splits:
        splits["train"], splits["validation"] = split_off(splits["train"], validation_fraction, seed)
        metadata["validation"] = (
            f"seeded {validation_fraction:.0%} of the TFDS train split (seed {seed}); train is the rest"
        )
    names = tuple(features["label"].names)
    return Dataset(name, "classification", splits, shape, names, len(names), None, metadata)


def split_off(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Splits `examples` into (rest, held-out) with a seeded `fraction` held out; both keep source order."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {fraction}")
    count = len(examples)
    held_out = max(1, int(round(fraction * count)))
    if held_out >= count:
        raise ValueError(f"cannot hold out {fraction:.0%} of {count} examples and keep any for training")
    order = np.random.default_rng(seed).permutation(count)
    base = np.arange(count) if examples.indices is None else examples.indices
    rest, kept = np.sort(order[held_out:]), np.sort(order[:held_out])

    def view(positions: np.ndarray) -> Examples:
        return Examples(
            examples.source,
            image_key=examples.image_key,
            target_key=examples.target_key,
            columns=examples.columns,
            label_key=examples.label_key,
            indices=base[positions],
        )

    return view(rest), view(kept)


__all__ = ["Dataset", "Examples", "load_dataset", "split_off", "lens", "cosmosim"]
