"""Shared test settings (float32 CPU JAX, deterministic torch on few threads) and helpers for the tests that
run train.py / evaluate.py: tiny configurations, the CLI runners (a new process, or main() in this one), and a
run paused at a known step."""

import functools
import importlib.util
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_AT_STEP_ENV = "JAXNETS_PAUSE_AT_STEP"  # jaxnets.experiment.PAUSE_AT_STEP_ENV, without importing JAX here

# The smallest useful run: an MLP on 32 px lens images, 96 training examples in 6 batches of 16 per epoch.
TINY = dict(
    model="mlp",
    hidden=(32,),
    image_size=32,
    num_train=96,
    num_validation=16,
    num_test=20,
    batch_size=16,
    epochs=2,
    compilation_cache="",
    # The lecture's optimiser and precision: the tests' expectations (exact losses, NaN steps) assume them.
    schedule="constant",
    lr=1e-3,
    precision="f32",
)

# A small CosmoSim 3.3 dataset TOML (SIE/SIS/point-mass lenses, an elliptical Sersic source, nterms 3) for the
# tests that run the simulator: `{size}`, `{imagesize}` and `{cropsize}` to fill in.
COSMOSIM_TOML = """
[simulator]
model = [ "Raytrace", "Roulette" ]
size = {size}
nterms = 3
imagesize = {imagesize}
cropsize = {cropsize}

[lens]
mode = [ "PM", "SIS", "SIE" ]
einstein-min = 2.5
einstein-max = 20
orientation-min = 0
orientation-max = 180
ellipseratio-min = 0.1
ellipseratio-max = 1.0

[source]
mode = "SersicEllipsoid"
sigma-min = 1.25
sigma-max = 8
sigma2-min = 1.25
sigma2-max = 8
theta-min = 0
theta-max = 180
position = "polar"

[position]
phi-min = 0
phi-max = 360
r-min = 1
r-max = 20
"""


def tiny_config(tmp_path, **changes):
    """The TINY run as a Config, its workdir and data under tmp_path; `changes` override any field."""
    from jaxnets.config import Config

    return Config(**{**TINY, "workdir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"), **changes})


def pytest_collection_modifyitems(items):
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)


def cli_args(**values) -> list[str]:
    """{"batch_size": 16, "hidden": (32, 16)} -> ["--batch-size", "16", "--hidden", "32,16"]."""
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def run_script(script: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs train.py or evaluate.py from the repository root; returns the finished process (text output)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@functools.cache
def main_of(script: str):
    """train.py's or evaluate.py's main(argv): the same command-line tool, callable in this process."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(capsys, script: str, *args) -> subprocess.CompletedProcess:
    """run_script's result from the script's main(argv) run in this process (capsys: pytest's output capture):
    for the tests whose subject is not the process itself, without a new process's start-up and compilations."""
    capsys.readouterr()
    code = main_of(script)([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *map(str, args)], code, out, err)


def start_paused(args: list[str], step: int) -> subprocess.Popen:
    """Starts train.py with args; returns once it has paused after training step `step`, waiting for a signal."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, PAUSE_AT_STEP_ENV: str(step)},
    )
    lines = []
    for line in process.stderr:  # tqdm redraws with \r, so the marker may share a line with the bar
        lines.append(line)
        if f"paused after step {step} " in line:
            return process
    process.wait()
    raise AssertionError(
        f"train.py never paused at step {step} (exit {process.returncode}):\n" + "".join(lines)[-3000:]
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS folder for the whole session: each tiny lens dataset is built once."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))
