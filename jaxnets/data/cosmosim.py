"""CosmoSim datasets: CosmoSim's CSV files beside their images, converted once to TFDS ArrayRecord files.

`build` checks every row and image first (one ValueError lists all problems), then lets TFDS write the dataset.

CosmoSim 3.x writes two CSV files per dataset, both keyed by `filename`; give either or both (joined on
`filename`, a column shared by both files taken from the first one given):

    parameter file (--csvfile): index,filename,model,einsteinradius,ellipseratio,orientation,lens,source,R,phi,
                                sigma,sigma2,theta,n_sersic,luminosity,x,y
    roulette file (--outfile):  filename,source,x,y,sigma,sigma2,theta,luminosity,n_sersic,lensX,lensY,...,
                                xiX,xiY,alpha[m][s]...,beta[m][s]...

CosmoSim 2023's single file (index,filename,source,lens,chi,x,y,einsteinR,sigma,sigma2,theta,nterms) works too.
A cluster of lenses sits in one text cell, `cluster` (`SIE/x/y/einsteinradius/ellipseratio/orientation;SIS/x/y/
einsteinradius;...`); its lenses' parameters are also read as the columns `einsteinradius[k]`, `ellipseratio[k]`
and `orientation[k]`, the lenses numbered from 1 by decreasing Einstein radius (CosmoSim lists them in the order it
drew them, which the image cannot show).
Targets are column names or shell-style patterns (`alpha[*][*]`: `*` and `?` are wildcards, brackets are
literal); `einsteinR`/`einsteinradius` and `ratio`/`ellipseratio` name the same parameter. Text columns and empty
cells outside the targets are ignored. Images: `filename` relative to `image_dir` (default: the first CSV's
folder, or its `images/` subfolder where CosmoSim's `--directory images` put them); any format Pillow reads,
converted to one 8-bit channel ('L') and, with `image_size`, resized (antialiased) to a square of that side.

The converted dataset lives in `<data_dir>/cosmosim_csv/<stem>_<key>/1.0.0`, where `key` hashes the bytes of
every CSV with every option, so a changed CSV or option converts again while an unchanged one loads at once.
TFDS writes into an `incomplete.*` folder and renames it only when every split is complete, so an interrupted or
failed conversion never looks like a finished one. Splits: the validation and test files when given, otherwise a
seeded permutation of the rows; the rows of each split are recorded in the dataset's metadata.json and in each
example's `row` feature (the 0-based data row of its first CSV).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from jaxnets.data.info import LocalDatasetInfo

# Columns that name or describe an example, never a target.
TEXT_COLUMNS = ("index", "filename", "model", "lens", "source", "cluster")
# Without --targets: the lens and source parameters present (CosmoSim 3.x and 2023 names), in the file's order.
PARAMETER_COLUMNS = (
    "x", "y", "einsteinradius", "einsteinR", "ellipseratio", "ratio", "orientation",
    "sigma", "sigma2", "theta", "R", "phi", "n_sersic", "luminosity",
)  # fmt: skip
# A cluster lens's parameters after its type and position (`SIE/x/y/einsteinradius/ellipseratio/orientation`), and
# the columns they are read into: einsteinradius[1] is the largest Einstein radius of the cluster.
CLUSTER_PARAMETERS = ("einsteinradius", "ellipseratio", "orientation")
CLUSTER_COLUMN = re.compile(r"(einsteinradius|ellipseratio|orientation)\[(\d+)\]")
# The roulette amplitudes alpha[m][s], beta[m][s] of the roulette file.
ROULETTE_AMPLITUDE = re.compile(r"(alpha|beta)\[(\d+)\]\[(\d+)\]")  # groups: alpha or beta, m, s
# Names of the same parameter in different CosmoSim versions.
ALIASES = ({"einsteinR", "einsteinradius"}, {"ratio", "ellipseratio"})
MAX_REPORTED_PROBLEMS = 20
# Part of the cache key: bump when the stored features or the split rule change.
FORMAT_VERSION = 2


def cluster_parameter(name: str) -> str:
    """The parameter a column holds: "orientation[2]" (a cluster's second lens) -> "orientation"; other names as
    they are."""
    match = CLUSTER_COLUMN.fullmatch(name)
    return match.group(1) if match else name


def cluster_lenses(cell: str) -> list[list[str]]:
    """The lenses of a `cluster` cell as CosmoSim writes it, `MODEL/x/y/einsteinradius[/ellipseratio/orientation]`
    joined by `;`: each lens's fields as written (an SIS has no ellipse), in CosmoSim's order."""
    return [spec.split("/") for spec in cell.split(";") if spec.strip()]


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Reads any image Pillow can open as one 8-bit channel: uint8 [H, W, 1], or [size, size, 1] resized with
    an antialiasing (Lanczos) filter."""
    with Image.open(path) as image:
        grey = image.convert("L")
        if size is not None and grey.size != (size, size):
            grey = grey.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(grey, dtype=np.uint8)[:, :, None]


@dataclasses.dataclass
class _Row:
    """One checked row: where it came from and what it holds."""

    csv_name: str
    row: int  # 0-based data row in its (first) CSV
    line: int  # line number in that file, for messages
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


# A cell as read: its text, and the file and line it came from (for messages).
Cell = tuple[str, str, int]


@dataclasses.dataclass
class _Table:
    """One CSV, or several joined on `filename`: the columns, and each row's cells with their origin."""

    paths: list[Path]
    header: list[str]
    rows: list[dict[str, Cell]]


def _read_table(paths: Sequence[Path], problems: _Problems) -> _Table:
    """Reads the CSVs and joins them on `filename` in the first file's row order; a filename found on one side
    only (or twice in one file) is a problem naming how many and which."""
    tables = []
    for path in paths:
        header, rows = _read_csv(path, problems)
        cells = [{column: (row.get(column) or "", path.name, line) for column in header} for line, row in rows]
        tables.append((path, header, cells))
    header = list(dict.fromkeys(column for _, columns, _ in tables for column in columns))
    first_path, _, rows = tables[0]
    if len(tables) == 1 or any("filename" not in columns for _, columns, _ in tables):
        return _with_cluster_columns(_Table(list(paths), header, rows))
    joined = [dict(row) for row in rows]
    first_names = [row["filename"][0].strip() for row in rows]
    for path, _, other in tables[1:]:
        by_name: dict[str, dict[str, Cell]] = {}
        for row in other:
            name = row["filename"][0].strip()
            if name in by_name:
                problems.add(f"{path.name} line {row['filename'][2]}: filename {name!r} appears twice")
            by_name[name] = row
        only_first = [name for name in first_names if name not in by_name]
        only_other = sorted(set(by_name) - set(first_names))
        for missing, here, there in ((only_first, first_path, path), (only_other, path, first_path)):
            if missing:
                problems.add(
                    f"{len(missing)} filename(s) of {here.name} are not in {there.name}, e.g. "
                    f"{', '.join(missing[:3])}: the files must describe the same images"
                )
        for row, name in zip(joined, first_names, strict=True):
            for column, cell in by_name.get(name, {}).items():
                row.setdefault(column, cell)  # a column in both files: the first file's value
    return _with_cluster_columns(_Table(list(paths), header, joined))


def _with_cluster_columns(table: _Table) -> _Table:
    """The table with its `cluster` cells also read as columns einsteinradius[k], ellipseratio[k] and
    orientation[k] (after `cluster` in the header). A lens without a parameter (an SIS has no ellipse) or a row
    with fewer lenses leaves the cell empty; a field that is not a number is kept as written, for the target
    check to name."""
    if "cluster" not in table.header:
        return table
    added: dict[str, None] = {}
    for row in table.rows:
        text, name, line = row.setdefault("cluster", ("", table.paths[0].name, 0))  # absent: a file lacks the row
        lenses = [fields[3:] for fields in cluster_lenses(text)]
        radii = [_number(fields[0]) if fields else None for fields in lenses]
        if None not in radii:  # numbered by decreasing Einstein radius; CosmoSim's order where one is unreadable
            lenses = [lens for _, lens in sorted(zip(radii, lenses, strict=True), key=lambda pair: -pair[0])]
        for k, fields in enumerate(lenses, 1):
            for parameter, field in zip(CLUSTER_PARAMETERS, fields, strict=False):
                row[f"{parameter}[{k}]"] = (field, name, line)
                added[f"{parameter}[{k}]"] = None
    for row in table.rows:  # empty where a lens has no such parameter: named with the row's line if a target
        for column in added:
            row.setdefault(column, ("", *row["cluster"][1:]))
    at = table.header.index("cluster") + 1
    table.header[at:at] = sorted(added, key=lambda column: int(CLUSTER_COLUMN.fullmatch(column).group(2)))
    return table


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _same_parameter(name: str, column: str) -> bool:
    return name == column or any(name in group and column in group for group in ALIASES)


def _pattern(text: str) -> re.Pattern | None:
    """A compiled pattern if text has a wildcard (`*`, `?`); brackets stay literal: alpha[*][*]."""
    if "*" not in text and "?" not in text:
        return None
    return re.compile(re.escape(text).replace(r"\*", ".*").replace(r"\?", "."))


def _has_empty_cells(table: _Table, column: str) -> bool:
    return any(not row.get(column, ("",))[0].strip() for row in table.rows)


def select_targets(
    requested: Sequence[str] | None, table: _Table, problems: _Problems
) -> tuple[list[str], set[str], list[str]]:
    """(target columns, those named explicitly, notes). Names may be aliases or patterns; without `requested`,
    the parameter columns present without empty cells (CosmoSim leaves a cell empty where a parameter does not
    apply, e.g. an SIS lens's ellipseratio; those columns are named in a note)."""
    candidates = [c for c in table.header if c not in TEXT_COLUMNS]
    notes = []
    if requested is None:
        present = [c for c in table.header if c in PARAMETER_COLUMNS]
        incomplete = [c for c in present if _has_empty_cells(table, c)]
        if incomplete:
            notes.append(
                f"not default targets, as some cells are empty: {', '.join(incomplete)} "
                "(name them in --targets, with --drop-incomplete to skip those rows)"
            )
        chosen = [c for c in present if c not in incomplete]
        if not chosen:
            problems.add(f"no numeric target column among {', '.join(PARAMETER_COLUMNS)}: use --targets")
        return chosen, set(), notes
    chosen, explicit = [], set()
    for spec in requested:
        pattern = _pattern(spec)
        if pattern is not None:
            matches = [c for c in candidates if pattern.fullmatch(c)]
            if not matches:
                problems.add(f"target pattern {spec!r} matches no column (columns: {', '.join(candidates)})")
            chosen += matches
            continue
        column = next((c for c in table.header if _same_parameter(spec, c)), None)
        if column is None or column in TEXT_COLUMNS:
            problems.add(f"target column {spec!r} missing (header: {','.join(table.header)})")
            continue
        if column in explicit:
            problems.add(f"targets repeat a column: {spec!r}")
        chosen.append(column)
        explicit.add(column)
    return list(dict.fromkeys(chosen)), explicit, notes


def _image_dir(table: _Table, image_dir: Path | None) -> Path:
    """The given folder, else the first CSV's folder, or its images/ subfolder if that is where the images are."""
    if image_dir is not None:
        return image_dir
    folder = table.paths[0].parent
    first = table.rows[0]["filename"][0].strip() if table.rows and "filename" in table.rows[0] else ""
    if first and not (folder / first).is_file() and (folder / "images" / first).is_file():
        return folder / "images"
    return folder


def _check_rows(
    table: _Table, targets: Sequence[str], image_dir: Path, problems: _Problems, *, drop_incomplete: bool
) -> tuple[list[_Row], int]:
    """(checked rows, rows dropped): target cells as numbers and image files present. A bad target cell is a
    problem naming file, line and column, or with drop_incomplete drops its row."""
    checked, dropped = [], 0
    for row_number, row in enumerate(table.rows):
        values, bad = [], []
        for column in targets:
            text, name, line = row.get(column, ("", table.paths[0].name, 0))
            value = _number(text)
            if value is None:
                what = "is empty" if not text.strip() else f"is not a finite number: {text!r}"
                bad.append(f"{name} line {line}: column {column!r} {what}")
            values.append(value)
        if bad and drop_incomplete:
            dropped += 1
            continue
        for message in bad:
            problems.add(message)
        filename, csv_name, line = row.get("filename", ("", table.paths[0].name, 0))
        filename = filename.strip()
        image_path = image_dir / filename
        if "filename" in table.header and (not filename or not image_path.is_file()):
            problems.add(f"{csv_name} line {line}: image file not found: {image_path if filename else '(empty)'}")
        target = None if bad else np.asarray(values, np.float32)
        checked.append(_Row(csv_name, row_number, line, filename, image_path, target))
    return checked, dropped


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
    image_size: int | None = None  # resize to this square side on conversion
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
        return LocalDatasetInfo(
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
            image = load_image(row.path, self.builder_config.image_size)
            if image.shape != expected:  # the file changed since it was checked: fail, TFDS deletes the rest
                raise ValueError(f"{row.path} changed during conversion: {image.shape} instead of {expected}")
            yield row.row, {"image": image, "target": row.target, "row": row.row, "filename": row.filename}


def cache_key(paths: Sequence[Path], image_dir: Path, options: dict) -> str:
    """sha256 of every CSV's bytes, the image folder and the options: 16 hex digits."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.is_file() else b"<none>")
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


def _paths(files: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if files is None:
        return []
    files = [files] if isinstance(files, (str, Path)) else list(files)
    return [Path(f).expanduser().resolve() for f in files]


def build(
    data: str | Path | Sequence[str | Path],
    *,
    image_dir: str | Path | None = None,
    validation_data: str | Path | Sequence[str | Path] | None = None,
    test_data: str | Path | Sequence[str | Path] | None = None,
    targets: Sequence[str] | None = None,
    angles: Mapping[str, float] | None = None,
    drop_incomplete: bool = False,
    image_size: int | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> tfds.core.DatasetBuilder:
    """Converts the CSVs once (checking everything first) and returns a builder for the stored dataset.

    data: one CosmoSim CSV, or several (parameter and roulette files) joined on `filename`. validation_data,
    test_data: files (or joined pairs) for those splits, instead of holding out validation_fraction /
    test_fraction of data's rows. targets: names, aliases or patterns (default: the parameters present).
    angles: target name -> period; only the chosen targets' entries are kept (in the metadata).
    drop_incomplete: drop rows with an empty or non-numeric target cell instead of refusing them.
    image_size: resize every image to image_size x image_size (antialiased); None keeps the files' size.
    A target constant on the training split is dropped with a warning when a pattern or the default chose it,
    refused when named. Raises ValueError listing every problem (up to MAX_REPORTED_PROBLEMS) before anything
    is written; warnings (dropped rows and targets) are in the metadata's "notes" and are shown again on loads.
    """
    data_paths, validation_paths, test_paths = _paths(data), _paths(validation_data), _paths(test_data)
    if not data_paths:
        raise ValueError("data: give at least one CSV file")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if isinstance(targets, str):
        targets = [targets]
    image_dir_path = None if image_dir is None else Path(image_dir).expanduser().resolve()
    options = {
        "targets": None if targets is None else list(targets),
        "angles": dict(sorted((angles or {}).items())),
        "drop_incomplete": drop_incomplete,
        "image_size": image_size,
        "seed": seed,
        "validation_fraction": None if validation_paths else validation_fraction,
        "test_fraction": None if test_paths else test_fraction,
        "files": [[str(p) for p in group] for group in (data_paths, validation_paths, test_paths)],
    }
    stem = data_paths[0].stem
    safe_stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "dataset"
    all_paths = data_paths + validation_paths + test_paths
    config_name = f"{safe_stem}_{cache_key(all_paths, image_dir_path or data_paths[0].parent, options)}"
    root = Path(data_dir).expanduser() if data_dir else Path(tfds.core.constants.get_default_data_dir())
    finished = root / CosmoSimCsv.name / config_name / str(CosmoSimCsv.VERSION)
    if (finished / "dataset_info.json").is_file():
        return tfds.builder_from_directory(finished)

    problems = _Problems()
    tables = {"data": _read_table(data_paths, problems)}
    for name, paths in (("validation", validation_paths), ("test", test_paths)):
        if paths:
            tables[name] = _read_table(paths, problems)
    chosen, explicit, notes = select_targets(targets, tables["data"], problems)
    checked, dropped, folders = {}, {}, {}
    for name, table in tables.items():
        if not table.header:
            continue
        folders[name] = _image_dir(table, image_dir_path)
        checked[name], dropped[name] = _check_rows(
            table, chosen, folders[name], problems, drop_incomplete=drop_incomplete
        )
    all_rows = [row for rows in checked.values() for row in rows]
    shape = _check_images(all_rows, problems)
    what = ", ".join(str(p) for p in all_paths)
    problems.raise_if_any(what)
    if sum(dropped.values()):
        notes.append(
            f"dropped {sum(dropped.values())} row(s) with an empty or non-numeric target cell "
            f"({', '.join(f'{n} in {k}' for k, n in dropped.items() if n)})"
        )

    splits = split_rows(
        len(checked["data"]),
        0.0 if validation_paths else validation_fraction,
        0.0 if test_paths else test_fraction,
        seed,
    )
    split_examples = {name: [checked["data"][i] for i in numbers] for name, numbers in splits.items()}
    recorded = {name: numbers.tolist() for name, numbers in splits.items()}
    for name in ("validation", "test"):
        if name in checked:
            split_examples[name] = checked[name]
            recorded[name] = f"all rows of {', '.join(p.name for p in tables[name].paths)}"
    chosen = _drop_constant_targets(chosen, explicit, split_examples, notes, problems)
    problems.raise_if_any(what)
    for rows in split_examples.values():
        for row in rows:
            row.target = row.target[[i for i, keep in enumerate(chosen.values()) if keep]]
    names = [name for name, keep in chosen.items() if keep]
    metadata = {
        "csv": [str(p) for p in data_paths],
        "validation_csv": [str(p) for p in validation_paths] or None,
        "test_csv": [str(p) for p in test_paths] or None,
        "stem": stem,
        "image_dir": str(folders["data"]),
        "target_names": names,
        "angles": _angles_of(names, angles or {}),
        "seed": seed,
        "validation_fraction": options["validation_fraction"],
        "test_fraction": options["test_fraction"],
        "split_rows": recorded,
        "notes": notes,
    }
    side = (image_size, image_size) if image_size is not None else shape
    config = CsvConfig(
        name=config_name,
        description=f"{data_paths[0].name} ({', '.join(names)})",
        image_shape=(*side, 1),
        image_size=image_size,
        target_names=tuple(names),
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


def _angles_of(names: Sequence[str], angles: Mapping[str, float]) -> dict[str, float]:
    """The periods of the targets `names` that are angles: declared by name, or a cluster lens's orientation[k]
    by its parameter's name (orientation)."""
    periods = {name: angles.get(name, angles.get(cluster_parameter(name))) for name in names}
    return {name: period for name, period in periods.items() if period is not None}


def _drop_constant_targets(
    targets: Sequence[str], explicit: set[str], splits: Mapping[str, Sequence[_Row]], notes: list, problems: _Problems
) -> dict[str, bool]:
    """{target: keep}: a target constant on the training split cannot be learned (and its R² is undefined): a
    named one is a problem, one a pattern or the default chose is dropped with a note."""
    train = np.stack([row.target for row in splits.get("train", [])]) if splits.get("train") else None
    keep = {name: True for name in targets}
    if train is None:
        return keep
    constant = [name for i, name in enumerate(targets) if np.ptp(train[:, i]) == 0]
    for name in constant:
        if name in explicit:
            problems.add(
                f"target {name!r} is constant ({train[0, targets.index(name)]:g}) on the training split: "
                "it cannot be learned; leave it out of --targets"
            )
        keep[name] = False
    dropped = [name for name in constant if name not in explicit]
    if dropped:
        notes.append(f"dropped {len(dropped)} target(s) constant on the training split: {', '.join(dropped)}")
    if not any(keep.values()) and not (set(constant) & explicit):
        problems.add("every target is constant on the training split: nothing to learn")
    return keep
