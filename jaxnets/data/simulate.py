"""CosmoSim as a data source: `simulate` writes a seeded, cached dataset in the format of `python -m CosmoSim`.

Seeded chunks of rows are simulated by worker processes and joined in order: the files do not depend on the workers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import multiprocessing
import os
import random
import secrets
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

INSTALL_COSMOSIM = "pip install 'jaxnets[cosmosim]'"
# Rows per chunk: each chunk is seeded from (seed, chunk index), so changing this changes every dataset.
CHUNK_SIZE = 64
# Part of the cache key and the manifest: bump when the output for the same inputs changes (e.g. CHUNK_SIZE).
FORMAT_VERSION = 1
PARAMS_CSV = "params.csv"
ROULETTE_CSV = "roulette.csv"
IMAGE_DIR = "images"
MANIFEST = "simulate.json"  # written last: a folder without it (or with other inputs in it) is not a cached result


@dataclasses.dataclass(frozen=True)
class SimulatedFiles:
    """A simulated dataset on disk, as the CosmoSim command line writes it.

    params_csv: one row per example, header `index,filename,model,...` (depends on the TOML), floats `%.4f`;
    roulette_csv: one row per example, header `filename,source,x,y,...,alpha[m][s]...,beta[m][s]...`;
    image_dir: `image-NNNNNN.png` (index from 1), 8-bit greyscale ('L'), imagesize or cropsize pixels square.
    The CSVs' `filename` column (`images/image-NNNNNN.png`) is relative to `directory`, the CSVs' folder.
    """

    directory: Path
    params_csv: Path
    roulette_csv: Path
    image_dir: Path
    count: int


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """The work of one worker call: rows first .. first + rows - 1 (CosmoSim's 1-based index) of the dataset."""

    toml: dict[str, Any]  # the parsed TOML, with [simulator] size = rows and nterms applied
    first: int
    rows: int
    python_seed: int
    numpy_seed: tuple[int, ...]
    directory: str
    flags: tuple[str, ...]  # command-line options after --rnd --csvfile ... --directory ...


def cache_directory(root: str | Path, toml: str | Path, count: int, seed: int = 0, nterms: int | None = None) -> Path:
    """The folder under `root` for these inputs: `<root>/cosmosim_simulated/<toml stem>_<16 hex digits>`.

    The digits hash the TOML's bytes, count, seed, nterms and FORMAT_VERSION, so changing any of them names a
    new folder while the same inputs find the folder simulated before.
    """
    toml = Path(toml)
    return Path(root) / "cosmosim_simulated" / f"{toml.stem}_{_cache_key(_read_toml(toml), count, seed, nterms)}"


def simulate(
    toml: str | Path,
    count: int,
    directory: str | Path,
    *,
    seed: int = 0,
    workers: int | None = None,
    nterms: int | None = None,
    progress: bool = True,
) -> SimulatedFiles:
    """Generates `count` CosmoSim examples from the dataset TOML into `directory`, exactly in CosmoSim's own
    output format: params.csv, roulette.csv (same headers and formatting as the CLI writes) and
    images/image-NNNNNN.png (filenames in the CSVs relative to directory). Returns the paths.

    Each chunk of CHUNK_SIZE rows is what `python -m CosmoSim --toml <toml> --rnd --csvfile params.csv
    --outfile roulette.csv [--imagesize N] [--nterms N]` writes when [simulator] size is the chunk's rows and
    `random` and `numpy.random` are seeded from (seed, chunk index), except that the index runs on across
    chunks and the filenames carry the `images/` prefix. So the same TOML, count and seed give byte-identical
    files whatever `workers` is, and a smaller count gives the first rows of a larger one.

    count replaces the TOML's [simulator] size; nterms, when given, its [simulator] nterms (the number of
    roulette terms: roulette.csv's alpha/beta columns). Image size, crop and centring come from the TOML's
    [simulator] imagesize (default 512), cropsize and centred; imagesize and nterms are also given as
    --imagesize and --nterms, as the CLI's --imagesize default would otherwise override the TOML's imagesize.
    workers: processes (default os.cpu_count()). A script that calls this needs `if __name__ == "__main__":`,
    as the workers are spawned and import the main module.

    If `directory` already holds a complete result for the same inputs (and CosmoSim version), it is returned
    at once; an earlier simulate() result there with other inputs is replaced; any other non-empty folder is
    an error. The work happens in a hidden sibling folder that is renamed into place when complete.
    """
    toml = Path(toml)
    toml_bytes = _read_toml(toml)
    _check_int("count", count, 1)
    _check_int("seed", seed, 0)
    if workers is not None:
        _check_int("workers", workers, 1)
    if nterms is not None:
        _check_int("nterms", nterms, 1)
    count, seed, nterms = _integers(count, seed, nterms)
    config = _parse_toml(toml, toml_bytes)
    version = _cosmosim_version()
    given = Path(directory)
    files = SimulatedFiles(given, given / PARAMS_CSV, given / ROULETTE_CSV, given / IMAGE_DIR, count)
    directory = Path(os.path.abspath(given))  # normalised, so that "." and "a/.." have a name and a parent
    manifest = {
        "format_version": FORMAT_VERSION,
        "cosmosim_version": version,
        "toml_sha256": hashlib.sha256(toml_bytes).hexdigest(),
        "count": count,
        "seed": seed,
        "nterms": nterms,
        "chunk_size": CHUNK_SIZE,
    }
    if _is_complete(directory, manifest):
        return files
    _check_replaceable(directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = directory.parent / f".{directory.name}.incomplete-{os.getpid()}-{secrets.token_hex(4)}"
    (scratch / IMAGE_DIR).mkdir(parents=True)
    try:
        chunks = [_chunk(config, index, count, seed, nterms, scratch) for index in range(math.ceil(count / CHUNK_SIZE))]
        results = _run_chunks(chunks, toml, int(workers or os.cpu_count() or 1), progress)
        _write_csvs(scratch, results)
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(scratch, directory, manifest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone already when it was renamed into place
    return files


def _read_toml(toml: Path) -> bytes:
    if not toml.is_file():
        raise ValueError(f"dataset TOML file not found: {toml}")
    return toml.read_bytes()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _integers(count: int, seed: int, nterms: int | None) -> tuple[int, int, int | None]:
    """Plain ints (numpy integers are accepted but are not JSON)."""
    return int(count), int(seed), None if nterms is None else int(nterms)


def _parse_toml(toml: Path, toml_bytes: bytes) -> dict[str, Any]:
    try:
        config = tomllib.loads(toml_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{toml} is not a valid TOML file: {_one_line(error)}") from None
    simulator = config.setdefault("simulator", {})
    if not isinstance(simulator, dict):
        raise ValueError(f"{toml}: [simulator] must be a table, got {simulator!r}")
    for key in ("imagesize", "nterms"):  # passed on CosmoSim's command line, which takes integers only
        if key in simulator and (
            isinstance(simulator[key], bool) or not isinstance(simulator[key], int) or simulator[key] < 1
        ):
            raise ValueError(f"{toml}: [simulator] {key} must be a positive integer, got {simulator[key]!r}")
    return config


def _cache_key(toml_bytes: bytes, count: int, seed: int, nterms: int | None) -> str:
    digest = hashlib.sha256(toml_bytes)
    digest.update(json.dumps([*_integers(count, seed, nterms), FORMAT_VERSION]).encode())
    return digest.hexdigest()[:16]


def _cosmosim_version() -> str:
    """CosmoSim's version, found without importing it (the workers import it; this process need not)."""
    if importlib.util.find_spec("CosmoSim") is None:
        raise ImportError(
            f"simulating a dataset needs CosmoSim, which is not installed; install it with: {INSTALL_COSMOSIM}"
        )
    try:
        return importlib.metadata.version("cosmosim")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on sys.path
        return "unknown"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _is_complete(directory: Path, manifest: dict[str, Any]) -> bool:
    try:
        found = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if found != manifest or not (directory / PARAMS_CSV).is_file() or not (directory / ROULETTE_CSV).is_file():
        return False
    # Cheap even for 10^5 files, and catches images deleted by hand.
    with os.scandir(directory / IMAGE_DIR) as entries:
        return sum(entry.name.endswith(".png") for entry in entries) == manifest["count"]


def _check_replaceable(directory: Path) -> None:
    """Only an absent or empty folder, or an earlier simulate() result, may be replaced: never the user's files."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder; choose another output directory")
    if (directory / MANIFEST).is_file() or not any(directory.iterdir()):
        return
    raise ValueError(
        f"{directory} already holds files that simulate() did not write; choose another directory or remove it"
    )


def _chunk_seeds(seed: int, chunk: int) -> tuple[int, tuple[int, ...]]:
    """Seeds for `random.seed` (128 bits) and `numpy.random.seed` (4 words) of one chunk, from (seed, chunk)."""
    words = np.random.SeedSequence(seed, spawn_key=(chunk,)).generate_state(8)
    return int.from_bytes(words[:4].tobytes(), "little"), tuple(int(w) for w in words[4:])


def _chunk(config: dict[str, Any], index: int, count: int, seed: int, nterms: int | None, scratch: Path) -> _Chunk:
    first = index * CHUNK_SIZE
    rows = min(CHUNK_SIZE, count - first)
    toml = copy.deepcopy(config)
    toml["simulator"]["size"] = rows
    if nterms is not None:
        # The TOML is cascaded over the command line, so --nterms alone would not override its nterms.
        toml["simulator"]["nterms"] = nterms
    python_seed, numpy_seed = _chunk_seeds(seed, index)
    return _Chunk(toml, first + 1, rows, python_seed, numpy_seed, str(scratch.absolute()), _flags(toml))


def _flags(toml: dict[str, Any]) -> tuple[str, ...]:
    """The CLI options that make CosmoSim use the TOML's settings.

    CosmoSim writes every parsed option into a shared default dict that each CSV row is then cascaded over, so
    --imagesize (default 512) overrides the TOML's [simulator] imagesize unless it is given the same value.
    """
    flags = []
    if "imagesize" in toml["simulator"]:
        flags += ["--imagesize", str(toml["simulator"]["imagesize"])]
    if "nterms" in toml["simulator"]:
        flags += ["--nterms", str(toml["simulator"]["nterms"])]
    return tuple(flags)


def _run_chunks(chunks: list[_Chunk], toml: Path, workers: int, progress: bool) -> list[tuple[list, list]]:
    """(params rows, roulette rows) of every chunk, in chunk order, simulated by `workers` processes."""
    results: list[Any] = [None] * len(chunks)
    # spawn, not fork: the parent may have imported JAX, whose threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    total = sum(chunk.rows for chunk in chunks)
    with (
        tqdm(total=total, unit="image", desc=f"Simulating {toml.name}", disable=not progress) as bar,
        concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool,
    ):
        futures = {pool.submit(_simulate_chunk, chunk): i for i, chunk in enumerate(chunks)}
        try:
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = _result(future, toml)
                bar.update(chunks[futures[future]].rows)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure: do not start the chunks still queued
    return results


def _result(future: concurrent.futures.Future, toml: Path) -> tuple[list, list]:
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool as error:
        raise RuntimeError(
            f"a CosmoSim worker process died while simulating {toml} ({_one_line(error)}); note that a script "
            "calling simulate() needs `if __name__ == '__main__':`, as the workers import the main module"
        ) from error
    except ImportError as error:
        raise ImportError(
            f"CosmoSim failed to import ({_one_line(error)}); reinstall it with: {INSTALL_COSMOSIM}"
        ) from error
    except OSError:
        raise  # the disk, not the TOML
    except Exception as error:
        raise ValueError(f"CosmoSim rejected {toml}: {type(error).__name__}: {_one_line(error)}") from error


def _write_csvs(directory: Path, results: list[tuple[list, list]]) -> None:
    """Both CSVs from all rows at once, with the CLI's own pandas calls, so the formatting is the CLI's."""
    import pandas as pd

    params = [row for chunk_params, _ in results for row in chunk_params]
    roulette = [row for _, chunk_roulette in results for row in chunk_roulette]
    pd.DataFrame(params).to_csv(directory / PARAMS_CSV, float_format="%.4f", index=False)
    pd.DataFrame(roulette).to_csv(directory / ROULETTE_CSV, sep=",", index=False)


def _move_into_place(scratch: Path, directory: Path, manifest: dict[str, Any]) -> None:
    if not directory.exists():
        try:
            scratch.rename(directory)
            return
        except OSError:
            if _is_complete(directory, manifest):
                return  # a concurrent call with the same inputs finished first
            if directory.exists() and any(directory.iterdir()):
                raise
    if _is_complete(directory, manifest):
        return
    _check_replaceable(directory)
    old = directory.parent / f".{directory.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    directory.rename(old)
    scratch.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


# In a worker: CosmoSim's default parameters (Arguments.skel) as imported. CosmoSim's getConfig writes every
# parsed option and CSV row into that module-level dict, so it is restored before each chunk: each chunk then
# runs as in a fresh CLI process, whatever chunks the worker simulated before.
_PRISTINE_SKEL: dict[str, Any] | None = None


def _simulate_chunk(chunk: _Chunk) -> tuple[list, list]:
    """Runs in a worker: what `python -m CosmoSim ... --rnd` does for one chunk, with the chunk's seeds.

    Returns (params rows, roulette rows) as the pandas Series CosmoSim builds; the images are written into
    chunk.directory/images.
    """
    global _PRISTINE_SKEL
    import pandas as pd
    from CosmoSim import dataset
    from CosmoSim.CLI import Arguments
    from CosmoSim.datagen import makeSingle

    if _PRISTINE_SKEL is None:
        _PRISTINE_SKEL = copy.deepcopy(Arguments.skel)
    Arguments.skel.clear()
    Arguments.skel.update(copy.deepcopy(_PRISTINE_SKEL))  # in place: Arguments' functions hold this very dict

    argv = ["--rnd", "--csvfile", PARAMS_CSV, "--outfile", ROULETTE_CSV, "--directory", chunk.directory, *chunk.flags]
    names = [f"{IMAGE_DIR}/image-{index:06}.png" for index in range(chunk.first, chunk.first + chunk.rows)]
    with contextlib.redirect_stdout(io.StringIO()):  # CosmoSim prints progress; the parent shows a bar instead
        # CosmoSim.__main__.main, then datagen.datagen and dataset.datasetgen, minus their file reading and
        # writing: the TOML comes parsed and the parent writes the CSVs of all chunks.
        cfg = Arguments.CosmoParser(prog="CosmoSim makeimage").getConfig(argv)
        param = Arguments.Parameters(cfg, copy.deepcopy(chunk.toml))
        toml = copy.deepcopy(chunk.toml)
        dataset.tomldefaults(toml)
        random.seed(chunk.python_seed)
        np.random.seed(chunk.numpy_seed)
        params = [
            dataset.getline(toml, index, fn=name, verbose=0)
            for index, name in zip(range(chunk.first, chunk.first + chunk.rows), names, strict=True)
        ]
        frame = pd.DataFrame(params)
        outcols = list(frame.columns)
        roulette = []
        for _, row in frame.iterrows():
            param.setRow(row)
            roulette.append(makeSingle(param, outcols=outcols, verbose=0).getData())
    for name in names:
        if not os.path.isfile(os.path.join(chunk.directory, name)):  # cv2.imwrite reports failure only by a flag
            raise OSError(f"CosmoSim did not write {os.path.join(chunk.directory, name)}")
    return params, roulette
