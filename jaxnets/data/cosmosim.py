"""CosmoSim datasets: a CSV of lens parameters beside its images, converted once to TFDS ArrayRecord files.

`build` checks every row and image first (one ValueError lists all problems), then lets TFDS write the dataset.

CSV header as CosmoSim writes it (other columns are allowed and ignored):

    index,filename,source,lens,chi,x,y,einsteinR,sigma,sigma2,theta,nterms

`filename` is relative to the CSV's folder (or to `image_dir`); any format Pillow reads, converted to one
8-bit channel ('L'). The converted dataset lives in `<data_dir>/cosmosim_csv/<stem>_<key>/1.0.0`, where
`key` hashes the CSV's bytes (and the test CSV's) with every option, so a changed CSV or option converts
again while an unchanged one loads at once. TFDS writes into an `incomplete.*` folder and renames it only
when every split is complete, so an interrupted or failed conversion never looks like a finished one.
Splits: train and validation (and test, unless a separate test CSV is given) are drawn by a seeded
permutation of the rows; the rows of each split are recorded in the dataset's metadata.json and in each
example's `row` feature (the 0-based data row of its CSV).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

CSV_HEADER = ("index", "filename", "source", "lens", "chi", "x", "y", "einsteinR", "sigma", "sigma2", "theta", "nterms")
PARAMETER_COLUMNS = ("x", "y", "einsteinR", "sigma", "sigma2", "theta")
MAX_REPORTED_PROBLEMS = 20
# Part of the cache key: bump when the stored features or the split rule change.
FORMAT_VERSION = 1


def load_image(path: str | Path) -> np.ndarray:
    """Reads any image Pillow can open as one 8-bit channel: uint8 [H, W, 1]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]


@dataclasses.dataclass
class _Row:
    """One checked CSV row: where it came from and what it holds."""

    csv_name: str
    row: int  # 0-based data row in its CSV
    line: int  # line number in the file, for messages
    filename: str  # as written in the CSV
    path: Path  # resolved image path
    target: np.ndarray | None


class _Problems:
    """Collects every problem found, so the user fixes them all in one go."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self, what: str) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_REPORTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        text = "\n".join(f"  - {m}" for m in shown) + (f"\n  ... and {more} more" if more else "")
        raise ValueError(f"{len(self.messages)} problem(s) in {what}; nothing was written:\n{text}")


def _read_csv(path: Path, problems: _Problems) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs; problems if the file is missing, empty or lacks `filename`."""
    if not path.is_file():
        problems.add(f"{path}: CSV file not found")
        return [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [(reader.line_num, row) for row in reader]
    if "filename" not in header:
        problems.add(f"{path.name}: no `filename` column (header: {','.join(header) or 'empty'})")
    if not rows:
        problems.add(f"{path.name}: no data rows")
    return header, rows


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def default_targets(header: Sequence[str], rows: Sequence[tuple[int, dict[str, str]]]) -> list[str]:
    """The parameter columns present that hold numbers (at least one numeric cell), in CosmoSim order."""
    return [c for c in PARAMETER_COLUMNS if c in header and any(_number(row.get(c)) is not None for _, row in rows)]


def _check_rows(path: Path, header, rows, targets: Sequence[str], image_dir: Path, problems: _Problems) -> list[_Row]:
    """Targets as numbers and image files present; collects a problem for each offending cell or file."""
    for column in targets:
        if column not in header:
            problems.add(f"{path.name}: target column {column!r} missing (header: {','.join(header)})")
    present = [c for c in targets if c in header]
    checked = []
    for row_number, (line, row) in enumerate(rows):
        values = []
        for column in present:
            value = _number(row.get(column))
            if value is None:
                problems.add(f"{path.name} line {line}: column {column!r} is not a finite number: {row.get(column)!r}")
            values.append(value)
        filename = (row.get("filename") or "").strip()
        image_path = image_dir / filename
        if "filename" in header and (not filename or not image_path.is_file()):
            problems.add(f"{path.name} line {line}: image file not found: {image_path if filename else '(empty)'}")
        target = np.asarray(values, np.float32) if len(present) == len(targets) and None not in values else None
        checked.append(_Row(path.name, row_number, line, filename, image_path, target))
    return checked


def _check_images(rows: Sequence[_Row], problems: _Problems) -> tuple[int, int] | None:
    """Opens every image once; unreadable files and sizes other than the most common one are problems."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, row in enumerate(tqdm(rows, desc="Checking images", unit="image", leave=False)):
        if not row.path.is_file():
            continue  # already reported as missing
        try:
            sizes[i] = load_image(row.path).shape[:2]
        except Exception as error:  # Pillow raises many types for bad files; all mean "unreadable"
            problems.add(f"{row.csv_name} line {row.line}: unreadable image {row.path}: {error}")
    if not sizes:
        return None
    common, _ = collections.Counter(sizes.values()).most_common(1)[0]
    for i, size in sizes.items():
        if size != common:
            problems.add(
                f"{rows[i].csv_name} line {rows[i].line}: image {rows[i].path} is {size[0]}x{size[1]} "
                f"(height x width); the others are {common[0]}x{common[1]}"
            )
    return common


@dataclasses.dataclass(eq=False)
class CsvConfig(tfds.core.BuilderConfig):
    """A checked CSV conversion: image shape, targets and the examples of each split."""

    image_shape: tuple[int, int, int] = (1, 1, 1)
    target_names: tuple[str, ...] = ()
    split_rows: dict = dataclasses.field(default_factory=dict)  # split -> list[_Row]
    metadata: dict = dataclasses.field(default_factory=dict)


class CosmoSimCsv(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A CosmoSim CSV+images folder as a TFDS dataset.

    Features: image uint8 [H, W, 1]; target float32 [P] (metadata `target_names`); row int64; filename text.
    """

    name = "cosmosim_csv"
    # See jaxnets.data.lens.Lens: avoids TFDS's lookup that needs the `importlib_resources` backport.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "CSV rows with their images, seeded train/validation/test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"CosmoSim dataset converted from {config.metadata.get('csv')}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=config.image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "target": tfds.features.Tensor(shape=(len(config.target_names),), dtype=np.float32),
                    "row": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "filename": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,  # keep CSV order within each split: reproducible and easy to check
            metadata=tfds.core.MetadataDict(config.metadata),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data is local
        return {split: self._generate_examples(rows) for split, rows in self.builder_config.split_rows.items()}

    def _generate_examples(self, rows: Sequence[_Row]) -> Iterator[tuple[int, dict]]:
        expected = self.builder_config.image_shape
        for row in rows:
            image = load_image(row.path)
            if image.shape != expected:  # the file changed since it was checked: fail, TFDS deletes the rest
                raise ValueError(f"{row.path} changed during conversion: {image.shape} instead of {expected}")
            yield row.row, {"image": image, "target": row.target, "row": row.row, "filename": row.filename}


def cache_key(data: Path, test_data: Path | None, image_dir: Path, options: dict) -> str:
    """sha256 of the CSV bytes (and the test CSV's), the image folder and the options: 16 hex digits."""
    digest = hashlib.sha256()
    for path in (data, test_data):
        digest.update(path.read_bytes() if path is not None and path.is_file() else b"<none>")
        digest.update(b"\0")
    digest.update(
        json.dumps({"image_dir": str(image_dir), "format": FORMAT_VERSION, **options}, sort_keys=True).encode()
    )
    return digest.hexdigest()[:16]


def split_rows(count: int, validation_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded split of `count` rows: split -> sorted row numbers. test_fraction 0 gives no test split."""
    for label, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{label} must be in [0, 1), got {fraction}")
    num_validation = int(round(validation_fraction * count))
    num_test = int(round(test_fraction * count))
    if num_validation + num_test >= count:
        raise ValueError(
            f"{count} rows leave no training rows after holding out "
            f"{num_validation} validation and {num_test} test rows"
        )
    order = np.random.default_rng(seed).permutation(count)
    splits = {
        "train": order[num_validation + num_test :],
        "validation": order[:num_validation],
        "test": order[num_validation : num_validation + num_test],
    }
    return {name: np.sort(rows) for name, rows in splits.items() if len(rows)}


def build(
    data: str | Path,
    *,
    image_dir: str | Path | None = None,
    test_data: str | Path | None = None,
    targets: Sequence[str] | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> tfds.core.DatasetBuilder:
    """Converts the CSV once (checking everything first) and returns a builder for the stored dataset.

    With `test_data`, its rows form the test split and `test_fraction` is ignored.
    Raises ValueError listing every problem (up to MAX_REPORTED_PROBLEMS) before anything is written.
    """
    data = Path(data).expanduser().resolve()
    test_path = None if test_data is None else Path(test_data).expanduser().resolve()
    image_dir_path = None if image_dir is None else Path(image_dir).expanduser().resolve()
    if isinstance(targets, str):
        targets = [targets]
    options = {
        "targets": None if targets is None else list(targets),
        "seed": seed,
        "validation_fraction": validation_fraction,
        "test_fraction": None if test_path is not None else test_fraction,
    }
    stem = data.stem
    safe_stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "dataset"
    config_name = f"{safe_stem}_{cache_key(data, test_path, image_dir_path or data.parent, options)}"
    root = Path(data_dir).expanduser() if data_dir else Path(tfds.core.constants.get_default_data_dir())
    finished = root / CosmoSimCsv.name / config_name / str(CosmoSimCsv.VERSION)
    if (finished / "dataset_info.json").is_file():
        return tfds.builder_from_directory(finished)

    problems = _Problems()
    header, rows = _read_csv(data, problems)
    if test_path is not None:
        test_header, test_rows = _read_csv(test_path, problems)
    chosen = list(targets) if targets is not None else default_targets(header, rows)
    if header and not chosen:
        problems.add(f"{data.name}: no numeric target column among {', '.join(PARAMETER_COLUMNS)}")
    if len(set(chosen)) != len(chosen):
        problems.add(f"targets repeat a column: {', '.join(chosen)}")
    checked = _check_rows(data, header, rows, chosen, image_dir_path or data.parent, problems) if header else []
    test_checked = []
    if test_path is not None and test_header:
        test_checked = _check_rows(
            test_path, test_header, test_rows, chosen, image_dir_path or test_path.parent, problems
        )
    shape = _check_images(checked + test_checked, problems)
    problems.raise_if_any(str(data) if test_path is None else f"{data} and {test_path}")

    splits = split_rows(len(checked), validation_fraction, 0.0 if test_path is not None else test_fraction, seed)
    split_examples = {name: [checked[i] for i in numbers] for name, numbers in splits.items()}
    recorded = {name: numbers.tolist() for name, numbers in splits.items()}
    if test_path is not None:
        split_examples["test"] = test_checked
        recorded["test"] = f"all rows of {test_path}"
    metadata = {
        "csv": str(data),
        "test_csv": None if test_path is None else str(test_path),
        "stem": stem,
        "image_dir": str(image_dir_path or data.parent),
        "target_names": chosen,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "test_fraction": options["test_fraction"],
        "split_rows": recorded,
    }
    config = CsvConfig(
        name=config_name,
        description=f"{data.name} ({', '.join(chosen)})",
        image_shape=(*shape, 1),
        target_names=tuple(chosen),
        split_rows=split_examples,
        metadata=metadata,
    )
    builder = CosmoSimCsv(config=config, data_dir=str(root), file_format="array_record")
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError:
        # Another process renamed its finished conversion of the same CSV into place first: use it.
        if not (finished / "dataset_info.json").is_file():
            raise
    return tfds.builder_from_directory(finished)
