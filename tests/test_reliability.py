"""Interrupted, diverging or fed bad input: training loses nothing and says what went wrong.

Most cases run the real train.py / evaluate.py in a subprocess and check the exit code and message.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from conftest import ROOT, cli_args, finish, run_in_process, run_script, start_paused
from conftest import TINY as TINY_RUN
from jaxnets import checkpoint, experiment, monitor, training
from jaxnets.checkpoint import Checkpointer
from jaxnets.config import Config

TINY = {**TINY_RUN, "num_train": 64, "num_test": 16, "epochs": 1}  # 4 steps per epoch
# Two epochs of 6 steps; signal tests pause at a known step of epoch 1 (JAXNETS_PAUSE_AT_STEP) and interrupt it.
TWO_EPOCHS = {**TINY_RUN, "epochs": 2}


def final_state(workdir):
    config = Config.load(workdir)
    dataset = experiment.load_data(config)
    template = training.TrainState.create(
        experiment.build_model(config, dataset), experiment.build_optimizer(config, 1)
    )
    checkpointer = Checkpointer(workdir, read_only=True)
    return checkpointer.restore(template)


def history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_epoch_checkpoints_and_resume_is_exact(tmp_path, data_dir, sent, code, capsys):
    interrupted = str(tmp_path / "interrupted")
    args = cli_args(**TWO_EPOCHS, workdir=interrupted, data_dir=data_dir)
    process = start_paused(args, step=3)
    process.send_signal(sent)
    returncode, _, err = finish(process)
    assert returncode == code, err[-2000:]
    assert f"{signal.Signals(sent).name} received" in err and "Resume with the same command" in err
    state, record = final_state(interrupted)
    assert (record["epoch"], record["batch"], int(state.step)) == (0, 3, 3)  # stopped inside epoch 1, at step 3
    resumed = run_in_process(capsys, "train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout and "epoch 1, batch 3" in resumed.stdout

    straight = str(tmp_path / "straight")
    experiment.train_and_evaluate(Config(**TWO_EPOCHS, workdir=straight, data_dir=data_dir))
    (state_a, record_a), (state_b, record_b) = final_state(straight), final_state(interrupted)
    assert record_a == record_b
    for a, b in zip(
        jax.tree.leaves(state_a.params) + jax.tree.leaves(state_a.opt_state),
        jax.tree.leaves(state_b.params) + jax.tree.leaves(state_b.opt_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert history(straight) == history(interrupted)
    assert [h["epoch"] for h in history(interrupted)] == [1, 2]


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_the_run_still_resumes(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    args = cli_args(**TWO_EPOCHS, workdir=workdir, data_dir=data_dir)
    process = start_paused(args, step=3)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == 130, err[-2000:]
    # The second Ctrl-C lands during the save or just after it: either way the exit is 130 at once.
    assert "Second interrupt" in err or "Saved a checkpoint" in err
    # Whatever the second Ctrl-C cut short, a new run starts or resumes cleanly and finishes.
    again = run_in_process(capsys, "train.py", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [h["epoch"] for h in history(workdir)] == [1, 2]


def test_second_interrupt_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(monitor.os, "_exit", lambda code: exits.append(code))
    with monitor.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT and exits == []  # the first one only asks to stop
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    assert stop.exit_code == 130
    assert "Second interrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_unfinished_checkpoint_folder_is_ignored_with_a_warning(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(Config(**TINY, workdir=workdir, data_dir=data_dir))
    checkpoints = os.path.join(workdir, "checkpoints")
    (step,) = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
    # What a kill -9 in the middle of orbax's save leaves behind: a temporary folder of a later step.
    shutil.copytree(
        os.path.join(checkpoints, str(step)), os.path.join(checkpoints, f"{step + 4}.orbax-checkpoint-tmp-1234")
    )
    with pytest.warns(UserWarning, match="ignoring 1 unfinished checkpoint"):
        checkpointer = Checkpointer(workdir, read_only=True)
    assert checkpointer.steps() == [step]
    result = run_in_process(capsys, "evaluate.py", "--workdir", workdir)
    assert result.returncode == 0 and f"step {step}" in result.stdout


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(Config(**TINY, workdir=workdir, data_dir=data_dir))
    good_step = Checkpointer(workdir, read_only=True).latest_step()
    # A learning rate of 1e30 blows the weights up within a step or two of epoch 2.
    result = run_script("train.py", *cli_args(**{**TINY, "epochs": 2, "lr": 1e30}, workdir=workdir, data_dir=data_dir))
    assert result.returncode == 3, result.stderr[-2000:]
    assert re.search(r"NaN or Inf at step \d+ in epoch 2", result.stderr)
    assert "lower learning rate" in result.stderr
    assert Checkpointer(workdir, read_only=True).steps() == [good_step]
    assert [h["epoch"] for h in history(workdir)] == [1]


def test_incompatible_workdir_is_refused_by_the_cli(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(Config(**TINY, workdir=workdir, data_dir=data_dir))
    result = run_script("train.py", *cli_args(**{**TINY, "hidden": (64,)}, workdir=workdir, data_dir=data_dir))
    assert result.returncode == 2
    assert "hidden: saved 32, requested 64" in result.stderr and "--workdir" in result.stderr


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    experiment.train_and_evaluate(Config(**TINY, workdir=workdir, data_dir=data_dir))
    return workdir


@pytest.mark.slow
def test_evaluate_on_missing_empty_or_corrupt_workdirs(tmp_path, trained_workdir, capsys):
    missing = run_in_process(capsys, "evaluate.py", "--workdir", tmp_path / "nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_in_process(capsys, "evaluate.py", "--workdir", tmp_path / "empty")
    assert empty.returncode == 2 and "train first" in empty.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained_workdir, corrupt)
    for root, _, files in os.walk(corrupt / "checkpoints"):
        for name in files:
            if "state" in root and not name.startswith("_"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"\0garbage" * 64)
    damaged = run_in_process(capsys, "evaluate.py", "--workdir", corrupt)
    assert damaged.returncode == 2 and "damaged" in damaged.stderr, damaged.stderr[-2000:]
    (corrupt / "config.json").write_text("{not json")
    config = run_in_process(capsys, "evaluate.py", "--workdir", corrupt)
    assert config.returncode == 2 and "config.json" in config.stderr


@pytest.mark.slow
def test_evaluate_unknown_step_lists_the_available_ones(trained_workdir, capsys):
    step = Checkpointer(trained_workdir, read_only=True).latest_step()
    result = run_in_process(capsys, "evaluate.py", "--workdir", trained_workdir, "--step", 999)
    assert result.returncode == 2
    assert "no checkpoint at step 999" in result.stderr and f"available steps: [{step}]" in result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="inception3", image_size=32), "at least 75x75"),
        (dict(dataset="no_such_dataset"), "no_such_dataset"),
        (dict(batch_size=128), "larger than the 64 examples"),
        (dict(num_validation=0), "--num-validation must be at least 1"),
    ],
)
@pytest.mark.slow
def test_bad_training_input_is_refused_before_anything_is_written(tmp_path, data_dir, change, message, capsys):
    workdir = tmp_path / "run"
    result = run_in_process(capsys, "train.py", *cli_args(**{**TINY, **change}, workdir=workdir, data_dir=data_dir))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "config.json").exists()


def test_init_from_a_file_that_is_not_an_inception3_state_dict(tmp_path, data_dir, torch):
    # The CLI's exit 2 and empty workdir for --init-from refusals: tests/test_fine_tune.py.
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    other = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    config = Config(**{**TINY, "model": "inception3", "image_size": 80}, data_dir=data_dir)
    dataset = experiment.load_data(config)
    for path, message in ((not_a_state_dict, "holds no state_dict"), (other, "not an Inception3 state_dict")):
        with pytest.raises(experiment.RunError, match=f"--init-from {path}: .*{message}"):
            experiment.build_model(dataclasses.replace(config, init_from=str(path)), dataset)


def damage(workdir, step):
    """Overwrites the array data of one checkpoint, as a disk error or a copy cut short would."""
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step))):
        for name in files:
            if "state" in root and not name.startswith("_"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"\0garbage" * 64)


@pytest.mark.slow
# No traceback after the warning: orbax's failed read leaves tensorstore reads calling back into its closed event
# loop, each reported as unraisable (printed on stderr outside pytest).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(Config(**TWO_EPOCHS, workdir=workdir, data_dir=data_dir))
    assert Checkpointer(workdir, read_only=True).steps() == [6, 12]  # the previous checkpoint is kept too
    damage(workdir, 12)
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", workdir)  # step 12 is the best: evaluate falls back
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "warning: checkpoint step 12" in evaluated.stderr and "damaged" in evaluated.stderr
    assert "evaluating the next best checkpoint instead" in evaluated.stderr
    assert "best checkpoint step 6 (validation loss" in evaluated.stdout
    resumed = run_in_process(
        capsys, "train.py", *cli_args(**{**TWO_EPOCHS, "epochs": 3}, workdir=workdir, data_dir=data_dir)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "warning: checkpoint step 12" in resumed.stderr and "falling back to the checkpoint before it" in resumed.stderr
    )
    assert "Resuming from" in resumed.stdout and "step 6: epoch 2, batch 0" in resumed.stdout
    assert [h["epoch"] for h in history(workdir)] == [1, 2, 3]
    assert 18 in Checkpointer(workdir, read_only=True).steps()


def small_filesystem(path, size="2m"):
    """A size-limited tmpfs at path (needs root); None where it cannot be mounted."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return path if mounted.returncode == 0 else None


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_message_and_keeps_the_checkpoints(tmp_path, data_dir, monkeypatch, capsys):
    small = small_filesystem(tmp_path / "small")
    workdir = str(tmp_path / "small" / "run")
    args = cli_args(**{**TWO_EPOCHS, "epochs": 3}, workdir=workdir, data_dir=data_dir)
    try:
        if small is not None:  # a real full disk: room for about one checkpoint of this model (~0.4 MB)
            with open(small / "filler", "wb") as f:
                f.write(b"\0" * 1_500_000)
            result = run_in_process(capsys, "train.py", *args)
            code, err = result.returncode, result.stderr
        else:  # no root: the checkpoints' disk reports 0 bytes free once the first checkpoint is there
            real = checkpoint.shutil.disk_usage

            def disk_usage(path):
                usage = real(path)
                full = os.path.basename(path) == "checkpoints" and any(n.isdigit() for n in os.listdir(path))
                return usage._replace(free=0) if full else usage

            monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
            with pytest.raises(checkpoint.CheckpointSaveError) as error:
                experiment.train_and_evaluate(Config(**{**TWO_EPOCHS, "epochs": 3}, workdir=workdir, data_dir=data_dir))
            code, err = error.value.exit_code, f"error: {error.value}"
        assert code == 4, err[-3000:]
        (message,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert f"not enough space to save checkpoint step 12 in {workdir}/checkpoints" in message
        assert "MB needed" in message and "intact" in message and "Traceback" not in err
        assert Checkpointer(workdir, read_only=True).steps() == [6]
        assert [h["epoch"] for h in history(workdir)] == [1]
        if small is not None:
            os.remove(small / "filler")  # space again: the same command resumes and finishes
            resumed = run_in_process(capsys, "train.py", *args)
            assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr[-3000:]
    finally:
        if small is not None:
            subprocess.run(["umount", str(small)], check=False)


def test_a_save_orbax_refuses_is_one_clear_error(tmp_path, data_dir, monkeypatch):
    workdir = str(tmp_path / "run")
    real_save = checkpoint.ocp.CheckpointManager.save

    def read_only_after_the_first(self, step, *args, **kwargs):
        if step > 6:
            raise PermissionError(13, "Permission denied", f"{self.directory}/{step}.orbax-checkpoint-tmp")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", read_only_after_the_first)
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"saving a checkpoint in .*checkpoints failed: .*"
                                                             r"Permission denied.*intact"):  # fmt: skip
        experiment.train_and_evaluate(Config(**TWO_EPOCHS, workdir=workdir, data_dir=data_dir))
    assert Checkpointer(workdir, read_only=True).steps() == [6]


def test_a_slow_data_source_warns_once_naming_read_threads(tmp_path, data_dir, monkeypatch):
    from jaxnets import data as data_lib

    real_one, real_many = data_lib.Examples.__getitem__, data_lib.Examples.__getitems__

    def slow_one(self, index):
        time.sleep(0.01)  # a network filesystem: 10 ms per example, far slower than the tiny MLP
        return real_one(self, index)

    def slow_many(self, indices):
        time.sleep(0.01 * len(indices))
        return real_many(self, indices)

    monkeypatch.setattr(data_lib.Examples, "__getitem__", slow_one)
    monkeypatch.setattr(data_lib.Examples, "__getitems__", slow_many)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = {**TWO_EPOCHS, "num_train": 16 * 20}  # epochs long enough to outlast the readers' head start
        experiment.train_and_evaluate(Config(**values, workdir=str(tmp_path / "run"), data_dir=data_dir))
    waits = [str(w.message) for w in caught if "waited on data" in str(w.message)]
    assert len(waits) == 1, waits  # once per run, not once per epoch
    assert re.search(r"waited on data for \d+% of epoch \d's training time.*raise --read-threads \(now 2\)", waits[0])


def test_the_progress_bar_moves_as_steps_finish_not_as_they_are_queued():
    """JAX queues steps without waiting for them: a bar advanced at each call raced CHECK_EVERY steps ahead, then
    stood still while the device caught up. After each call the step queued before the last one has finished."""

    @jax.jit
    def slow_step(x):  # tens of milliseconds: far longer than queueing it
        for _ in range(4):
            x = jax.numpy.tanh(x @ x)
        return x, {"loss": x.sum(), "count": jax.numpy.float32(1)}

    progress = monitor.Progress(Config(), 1, 0, 6, monitor.StopSignals(), show=False)
    x, queued, finished = jax.numpy.eye(1024) * 0.5, [], []
    jax.block_until_ready(slow_step(x))  # compiled before the timed calls
    for _ in range(6):
        x, metrics = slow_step(x)
        assert progress(None, metrics)
        queued.append(metrics)
        finished.append([m["loss"].is_ready() for m in queued[:-1]])
    progress.close()
    assert all(all(done) for done in finished), finished


RSS_PROBE = """
import json, os, sys
from jaxnets import experiment, monitor
from jaxnets.config import Config

samples, call = [], monitor.Progress.__call__
def probe(self, state, totals):
    keep_going = call(self, state, totals)
    step = int(state.step)
    if step % 25 == 0:
        with open("/proc/self/statm") as f:
            samples.append((step, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")))
    return keep_going
monitor.Progress.__call__ = probe
experiment.train_and_evaluate(Config(**json.loads(sys.argv[1])))
print(json.dumps(samples))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_memory_stays_flat_over_300_steps(tmp_path, data_dir):
    values = {**TINY_RUN, "num_train": 16 * 100, "epochs": 3, "workdir": str(tmp_path / "run"), "data_dir": data_dir}
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(values)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={**os.environ, "JAXNETS_HUGE_PAGES": "0"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = dict(json.loads(result.stdout.strip().splitlines()[-1]))
    assert max(samples) == 300
    # Warm after epoch 1 (100 steps): its end compiles the eval step and starts the checkpointer's threads.
    warm, end = samples[125], samples[300]
    assert end <= warm * 1.03, f"resident memory grew from {warm / 1e6:.0f} MB to {end / 1e6:.0f} MB: {samples}"


@pytest.mark.slow
def test_evaluate_options_do_what_help_says(tmp_path, trained_workdir, capsys):
    step = Checkpointer(trained_workdir, read_only=True).latest_step()
    by_step = run_in_process(capsys, "evaluate.py", "--workdir", trained_workdir, "--step", step)
    assert by_step.returncode == 0 and f"checkpoint step {step} (validation loss" in by_step.stdout
    validation = run_in_process(capsys, "evaluate.py", "--workdir", trained_workdir, "--split", "validation")
    assert validation.returncode == 0, validation.stderr[-3000:]
    report = json.loads(open(os.path.join(trained_workdir, "eval_validation.json")).read())
    assert report["split"] == "validation" and report["count"] == TINY["num_validation"]
    # --data-dir: the run's dataset moved elsewhere is read from there (the old folder is not rebuilt).
    workdir, old, moved = str(tmp_path / "run"), tmp_path / "data", tmp_path / "moved"
    experiment.train_and_evaluate(Config(**TINY, workdir=workdir, data_dir=str(old)))
    shutil.move(old, moved)
    elsewhere = run_in_process(capsys, "evaluate.py", "--workdir", workdir, "--data-dir", moved)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert not old.exists() and f"examples: {TINY['num_test']}" in elsewhere.stdout
