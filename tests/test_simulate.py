"""Tests for jaxnets.data.simulate with the real CosmoSim: small 64 px simulations, two chunks of rows."""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import COSMOSIM_TOML

pytest.importorskip("CosmoSim")

from jaxnets.data import simulate as sim  # noqa: E402  (after the skip: without CosmoSim there is nothing to test)

pytestmark = pytest.mark.slow  # spawns CosmoSim workers and the CLI: about 30 s on 2 cores

COUNT = 70  # two chunks: 64 rows and 6
SEED = 3
CROP = 48
NTERMS = 3  # as in conftest.COSMOSIM_TOML
TOML = COSMOSIM_TOML.format(size=20, imagesize=64, cropsize=CROP)
# As `python -m CosmoSim --toml dataset.toml --rnd ...` writes them for this TOML.
PARAMS_HEADER = (
    "index,filename,model,einsteinradius,ellipseratio,orientation,lens,source,R,phi,sigma,sigma2,theta,n_sersic,"
    "luminosity,x,y"
)
ROULETTE_HEADER = "filename,source,x,y,sigma,sigma2,theta,luminosity,n_sersic,lensX,lensY,centreX,centreY,"
ROULETTE_HEADER += "reletaX,reletaY,offsetX,offsetY,xiX,xiY,"
ROULETTE_HEADER += ",".join(
    f"{name}[{m}][{s}]" for name in ("alpha", "beta") for m in range(NTERMS + 1) for s in range(1 - m % 2, m + 2, 2)
)


@pytest.fixture(scope="module")
def toml_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toml") / "small.toml"
    path.write_text(TOML)
    return path


@pytest.fixture(scope="module")
def dataset(toml_path, tmp_path_factory) -> sim.SimulatedFiles:
    return sim.simulate(toml_path, COUNT, tmp_path_factory.mktemp("a") / "out", seed=SEED, workers=2, progress=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_first_chunk_is_what_the_cosmosim_cli_writes(dataset, toml_path, tmp_path):
    python_seed, numpy_seed = sim._chunk_seeds(SEED, 0)
    (tmp_path / "chunk.toml").write_text(toml_path.read_text().replace("size = 20", f"size = {sim.CHUNK_SIZE}"))
    run_cli = f"""
        import random, runpy, sys
        import numpy as np
        random.seed({python_seed})
        np.random.seed({list(numpy_seed)})
        sys.argv = ["CosmoSim", "--toml", "chunk.toml", "--rnd", "--csvfile", "params.csv", "--outfile",
                    "roulette.csv", "--directory", "images", "--imagesize", "64", "--nterms", "{NTERMS}"]
        runpy.run_module("CosmoSim", run_name="__main__", alter_sys=True)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(run_cli)], cwd=tmp_path, check=True, capture_output=True)

    for name, header in (("params.csv", PARAMS_HEADER), ("roulette.csv", ROULETTE_HEADER)):
        ours = (dataset.directory / name).read_text().splitlines()
        # The CLI names images relative to --directory; simulate() relative to the CSV's folder.
        cli = (tmp_path / name).read_text().replace("image-0", "images/image-0").splitlines()
        assert ours[0] == cli[0] == header
        assert len(cli) == sim.CHUNK_SIZE + 1
        assert ours[: sim.CHUNK_SIZE + 1] == cli
    cli_images = sorted((tmp_path / "images").iterdir())
    assert len(cli_images) == sim.CHUNK_SIZE
    for path in cli_images:
        assert (dataset.image_dir / path.name).read_bytes() == path.read_bytes()


def test_rows_and_images(dataset):
    params, roulette = _rows(dataset.params_csv), _rows(dataset.roulette_csv)
    names = [f"images/image-{i:06}.png" for i in range(1, COUNT + 1)]
    assert [int(row["index"]) for row in params] == list(range(1, COUNT + 1))
    assert [row["filename"] for row in params] == [row["filename"] for row in roulette] == names
    assert re.fullmatch(r"-?\d+\.\d{4}", params[0]["einsteinradius"])  # the CLI's %.4f
    assert sorted(p.name for p in dataset.image_dir.iterdir()) == [Path(name).name for name in names]
    for name in names:
        with Image.open(dataset.directory / name) as image:
            assert (image.mode, image.size) == ("L", (CROP, CROP))
    assert {p.name for p in dataset.directory.iterdir()} == {"params.csv", "roulette.csv", "images", sim.MANIFEST}
    assert [p.name for p in dataset.directory.parent.iterdir()] == ["out"]  # no scratch folder left behind
    assert dataset.count == COUNT


def test_same_seed_is_byte_identical_with_one_worker(dataset, toml_path, tmp_path):
    again = sim.simulate(toml_path, COUNT, tmp_path / "out", seed=SEED, workers=1, progress=False)
    assert _files(again.directory) == _files(dataset.directory)


def test_other_seed_differs_and_replaces_an_earlier_result(dataset, toml_path, tmp_path):
    other = sim.simulate(toml_path, 8, tmp_path / "out", seed=SEED + 1, workers=1, progress=False)
    ours, theirs = _rows(dataset.params_csv)[:8], _rows(other.params_csv)
    for column in ("einsteinradius", "sigma", "x", "y"):
        assert all(a[column] != b[column] for a, b in zip(ours, theirs, strict=True))

    # Same folder, other inputs: the earlier result is replaced, and a smaller count is a prefix of a larger one.
    prefix = sim.simulate(toml_path, 8, tmp_path / "out", seed=SEED, workers=1, progress=False)
    assert json.loads((prefix.directory / sim.MANIFEST).read_text())["seed"] == SEED
    assert prefix.params_csv.read_text().splitlines() == dataset.params_csv.read_text().splitlines()[:9]
    assert len(list(prefix.image_dir.iterdir())) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cached_result_returns_without_simulating(dataset, toml_path, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in dataset.directory.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("simulated again instead of using the cached result")

    monkeypatch.setattr(sim, "_run_chunks", fail)
    assert sim.simulate(toml_path, COUNT, dataset.directory, seed=SEED, workers=1) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.directory.rglob("*")} == before
    # Other inputs are not the cached result.
    with pytest.raises(AssertionError, match="simulated again"):
        sim.simulate(toml_path, COUNT, dataset.directory, seed=SEED, nterms=2, progress=False)


def test_interrupted_run_leaves_no_folder(toml_path, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "_write_csvs", interrupt)  # after the workers wrote images into the scratch folder
    with pytest.raises(KeyboardInterrupt):
        sim.simulate(toml_path, 2, tmp_path / "out", workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_toml_cosmosim_rejects_is_a_one_line_value_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TOML.replace('mode = [ "PM", "SIS", "SIE" ]', 'mode = "Nonsense"'))
    with pytest.raises(ValueError, match=r"CosmoSim rejected .*bad\.toml: KeyError: 'Nonsense'") as error:
        sim.simulate(bad, 3, tmp_path / "out", workers=1, progress=False)
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.toml"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"toml": "missing.toml"}, "dataset TOML file not found"),
        ({"count": 0}, "count must be an integer of at least 1"),
        ({"count": 2.5}, "count must be an integer"),
        ({"seed": -1}, "seed must be an integer of at least 0"),
        ({"workers": 0}, "workers must be an integer of at least 1"),
        ({"nterms": 0}, "nterms must be an integer of at least 1"),
        ({"toml_text": "[simulator\n"}, "is not a valid TOML file"),
        ({"toml_text": 'simulator = "fast"\n'}, r"\[simulator\] must be a table"),
        ({"toml_text": TOML.replace("imagesize = 64", "imagesize = 64.5")}, "imagesize must be a positive integer"),
        ({"foreign_file": True}, "already holds files that simulate"),
    ],
)
def test_bad_input_is_a_value_error(toml_path, tmp_path, change, message):
    toml = tmp_path / change["toml"] if "toml" in change else toml_path
    if "toml_text" in change:
        toml = tmp_path / "changed.toml"
        toml.write_text(change["toml_text"])
    out = tmp_path / "out"
    if change.get("foreign_file"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=message):
        sim.simulate(
            toml,
            change.get("count", 3),
            out,
            progress=False,
            **{k: v for k, v in change.items() if k in ("seed", "workers", "nterms")},
        )
    assert (out / "notes.txt").exists() if change.get("foreign_file") else not out.exists()


def test_without_cosmosim_the_error_says_how_to_install(toml_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "CosmoSim", None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape(sim.INSTALL_COSMOSIM)):
        sim.simulate(toml_path, 3, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_importing_the_module_does_not_import_cosmosim():
    check = "import sys, jaxnets.data.simulate; assert 'CosmoSim' not in sys.modules, 'imported CosmoSim'"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_cache_directory_names_the_inputs(toml_path, tmp_path):
    path = sim.cache_directory(tmp_path, toml_path, COUNT, SEED, None)
    assert path.parent == tmp_path / "cosmosim_simulated"
    assert re.fullmatch(r"small_[0-9a-f]{16}", path.name)
    assert sim.cache_directory(tmp_path, toml_path, COUNT, SEED, None) == path
    others = {
        sim.cache_directory(tmp_path, toml_path, COUNT + 1, SEED, None),
        sim.cache_directory(tmp_path, toml_path, COUNT, SEED + 1, None),
        sim.cache_directory(tmp_path, toml_path, COUNT, SEED, 2),
    }
    changed = tmp_path / "small.toml"
    changed.write_text(TOML.replace("sigma-max = 8", "sigma-max = 9"))
    others.add(sim.cache_directory(tmp_path, changed, COUNT, SEED, None))
    assert path not in others and len(others) == 4
    with pytest.raises(ValueError, match="not found"):
        sim.cache_directory(tmp_path, tmp_path / "missing.toml", COUNT, SEED)


def test_train_and_evaluate_on_a_simulated_dataset_through_the_cli(toml_path, tmp_path, capsys):
    from conftest import cli_args, run_in_process

    args = cli_args(
        simulate=toml_path, num_train=48, num_validation=8, num_test=8, seed=SEED, model="mlp", hidden=(16,),
        batch_size=8, epochs=1, targets=("sigma", "theta", "xiX"), compilation_cache="",
        workdir=tmp_path / "run", data_dir=tmp_path / "data",
    )  # fmt: skip
    trained = run_in_process(capsys, "train.py", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (manifest,) = (tmp_path / "data" / "cosmosim_simulated").glob("*/simulate.json")
    assert json.loads(manifest.read_text())["count"] == 64 and json.loads(manifest.read_text())["seed"] == SEED
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", tmp_path / "run")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "examples: 8" in evaluated.stdout and "theta*" in evaluated.stdout  # the test split; theta an angle
    # Loading again with the same TOML, sizes and seed reuses the simulation (and the conversion).
    from jaxnets.data import load_dataset

    before = manifest.stat().st_mtime_ns
    again = load_dataset(simulate=str(toml_path), num_train=48, num_validation=8, num_test=8, seed=SEED,
                         targets=("sigma", "theta", "xiX"), data_dir=str(tmp_path / "data"))  # fmt: skip
    assert {k: len(v) for k, v in again.splits.items()} == {"train": 48, "validation": 8, "test": 8}
    assert manifest.stat().st_mtime_ns == before


def test_without_the_extra_the_cli_says_how_to_install(toml_path, tmp_path):
    # train.py as a user runs it, with CosmoSim hidden from the import system.
    hide = textwrap.dedent(f"""
        import importlib.util, runpy, sys
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: None if name == "CosmoSim" else find_spec(name, *a, **k)
        sys.argv = ["train.py", "--simulate", {str(toml_path)!r}, "--workdir", {str(tmp_path / "run")!r},
                    "--data-dir", {str(tmp_path / "data")!r}, "--model", "mlp"]
        runpy.run_path("train.py", run_name="__main__")
    """)
    from conftest import ROOT

    result = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAXNETS_HUGE_PAGES": "0"})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install 'jaxnets[cosmosim]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
