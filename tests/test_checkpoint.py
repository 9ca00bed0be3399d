"""The latest and the best checkpoint survive restarts, interrupts and changed options (issue 18), through the CLI."""

import json
import os
import signal

import pytest

from conftest import TINY, cli_args, finish, run_in_process, start_paused

pytestmark = pytest.mark.slow


def saved_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def validation_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {record["step"]: record["validation_loss"] for record in map(json.loads, f)}


def train(capsys, workdir, data_dir, **changes):
    result = run_in_process(capsys, "train.py", *cli_args(**{**TINY, **changes}, workdir=workdir, data_dir=data_dir))
    assert result.returncode == 0, result.stderr[-3000:]


def assert_evaluate_picks(capsys, workdir, step, *flags):
    result = run_in_process(capsys, "evaluate.py", "--workdir", workdir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = validation_losses(workdir)[step]
    assert f"best checkpoint step {step} (validation loss {loss:.6g})" in result.stdout, result.stdout
    assert json.loads(open(os.path.join(workdir, "eval_test.json")).read())["step"] == step


def test_the_best_checkpoint_survives_resumed_runs_that_diverge(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    train(capsys, workdir, data_dir, epochs=1)
    assert saved_steps(workdir) == [6]
    # Resumed with a learning rate that wrecks the model: every later epoch is worse than epoch 1.
    train(capsys, workdir, data_dir, epochs=2, lr=50)
    losses = validation_losses(workdir)
    assert losses[12] > losses[6]
    assert saved_steps(workdir) == [6, 12]  # the best (and the previous) and the latest
    # Two more resumes, so that step 6 is kept only as the best.
    train(capsys, workdir, data_dir, epochs=3, lr=50)
    assert saved_steps(workdir) == [6, 12, 18]  # the best and the two latest
    train(capsys, workdir, data_dir, epochs=4, lr=50)
    assert min(validation_losses(workdir).values()) == validation_losses(workdir)[6]
    assert saved_steps(workdir) == [6, 18, 24]  # step 6 is kept only as the best
    assert_evaluate_picks(capsys, workdir, 6)
    latest = run_in_process(capsys, "evaluate.py", "--workdir", workdir, "--latest")
    assert latest.returncode == 0 and "latest checkpoint step 24 (validation loss" in latest.stdout


def test_an_interrupt_save_never_displaces_the_best(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    train(capsys, workdir, data_dir, epochs=1)
    args = cli_args(**{**TINY, "epochs": 2, "lr": 50}, workdir=workdir, data_dir=data_dir)
    process = start_paused(args, step=9)  # halfway through epoch 2
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 143, err[-3000:]
    assert saved_steps(workdir) == [6, 9]  # the best (epoch 1) and the mid-epoch save
    train(capsys, workdir, data_dir, epochs=3, lr=50)
    assert saved_steps(workdir) == [6, 12, 18]  # the interrupt save gave way to the epochs' ends; the best stays
    assert_evaluate_picks(capsys, workdir, 6)
