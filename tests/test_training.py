import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import ROOT, TINY, cli_args
from jaxnets import experiment, losses, training
from jaxnets.checkpoint import Checkpointer, read_refit
from jaxnets.config import Config
from jaxnets.models import MLP
from jaxnets.models.layers import Conv2d
from jaxnets.monitor import read_history

WORKER = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")


def make_batch(rows=8, features=12, outputs=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(rows, features)).astype(np.float32),
        "target": rng.normal(size=(rows, outputs)).astype(np.float32),
        "mask": np.ones(rows, np.float32),
    }


def new_state(lr=1e-2, seed=0):
    return training.TrainState.create(MLP(12, [16], 3, rngs=nnx.Rngs(seed)), optax.adam(lr))


@pytest.fixture(scope="module")
def mesh():
    return training.data_mesh()


def test_train_step_lowers_loss_on_fixed_batch(mesh):
    state, batch = training.replicate(new_state(), mesh), make_batch()
    step = training.make_train_step(losses.mse)
    first = None
    for _ in range(10):
        state, metrics = step(state, training.shard_batch(batch, mesh))
        first = first if first is not None else training.summarize(metrics)["loss"]
    assert int(state.step) == 10
    assert training.summarize(metrics)["loss"] < 0.7 * first


class TinyConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = Conv2d(1, 4, 3, padding=1, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the train step keeps XLA's passes on GPU")
def test_train_step_keeps_the_barrier_that_rebuilds_the_columns(mesh):
    """On CPU the train step is compiled with conv.COMPILER_OPTIONS, so that a convolution's backward builds its
    columns again rather than keeping the forward's (test_conv); without them XLA drops the barrier."""
    state = training.TrainState.create(TinyConvNet(nnx.Rngs(0)), optax.adam(1e-3))
    batch = {**make_batch(rows=4), "image": np.ones((4, 6, 6, 1), np.float32)}
    program = training.make_train_step(losses.mse).lower(state, batch).compile().as_text()
    assert "opt-barrier" in program


def test_eval_step_is_the_plain_forward_pass(mesh):
    state, batch = new_state(), make_batch()
    metrics, predictions = training.make_eval_step(losses.mse, with_predictions=True)(
        state, training.shard_batch(batch, mesh)
    )
    expected = state.model()(jnp.asarray(batch["image"]))
    np.testing.assert_allclose(predictions, expected, rtol=1e-6)
    assert float(metrics["loss_sum"]) == pytest.approx(8 * float(losses.mse(expected, batch["target"])), rel=1e-6)


def test_masked_rows_change_nothing(mesh):
    batch = make_batch(rows=6)
    padded = {key: np.concatenate([value, np.full_like(value[:2], 7.0)]) for key, value in batch.items()}
    padded["mask"][6:] = 0.0
    step = training.make_train_step(losses.mse, donate=False)
    plain, plain_metrics = step(new_state(), training.shard_batch(batch, mesh))
    masked, masked_metrics = step(new_state(), training.shard_batch(padded, mesh))
    assert training.summarize(masked_metrics) == pytest.approx(training.summarize(plain_metrics))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(masked.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_evaluate_sums_every_example_once(mesh):
    state = new_state()
    batch_a, batch_b = make_batch(seed=1), make_batch(seed=2)
    batch_b["mask"][5:] = 0.0
    for i, b in enumerate((batch_a, batch_b)):
        b["index"] = np.arange(8) + 8 * i
    eval_step = training.make_eval_step(losses.mse, with_predictions=True)
    result = training.evaluate(state, [batch_a, batch_b], eval_step, mesh, with_predictions=True)
    images = np.concatenate([batch_a["image"], batch_b["image"][:5]])
    targets = np.concatenate([batch_a["target"], batch_b["target"][:5]])
    assert result["count"] == 13
    np.testing.assert_array_equal(result["index"], np.arange(13))
    np.testing.assert_allclose(result["targets"], targets)
    assert result["loss"] == pytest.approx(float(losses.mse(state.model()(images), targets)), rel=1e-5)


def test_adam_trajectory_matches_torch(torch, mesh):
    model = MLP(12, [16], 3, rngs=nnx.Rngs(3))
    torch_model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for torch_layer, layer in zip(torch_model[::2], model.layers, strict=True):
            torch_layer.weight.copy_(torch.from_numpy(np.array(layer.kernel[...]).T))
            torch_layer.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    criterion = torch.nn.MSELoss()
    state = training.replicate(training.TrainState.create(model, optax.adam(1e-2)), mesh)
    step = training.make_train_step(losses.mse)
    ours, theirs = [], []
    for i in range(20):
        batch = make_batch(seed=i)
        state, metrics = step(state, training.shard_batch(batch, mesh))
        ours.append(training.summarize(metrics)["loss"])
        optimizer.zero_grad()
        loss = criterion(torch_model(torch.from_numpy(batch["image"])), torch.from_numpy(batch["target"]))
        loss.backward()
        optimizer.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def _run_worker(*args):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _result(process):
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_device_result():
    return _result(_run_worker("single"))


def test_eight_devices_give_the_same_loss_as_one(single_device_result):
    eight = _result(_run_worker("devices"))
    assert single_device_result["devices"] == 1 and eight["devices"] == 8
    np.testing.assert_allclose(eight["losses"], single_device_result["losses"], rtol=1e-5)
    assert eight["kernel_sum"] == pytest.approx(single_device_result["kernel_sum"], rel=1e-5)


def test_the_step_read_back_from_the_step_cache_trains_on_eight_devices_as_the_jitted_step():
    cached, plain = _result(_run_worker("devices", "cached")), _result(_run_worker("devices"))
    assert cached["devices"] == 8 and cached["losses"] == plain["losses"]
    assert cached["kernel_sum"] == plain["kernel_sum"]


@pytest.mark.slow
def test_two_processes_agree_with_one(single_device_result):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    workers = [_run_worker("process", str(i), port) for i in range(2)]
    results = [_result(w) for w in workers]
    assert results[0]["devices"] == 2
    assert results[0] == results[1]
    np.testing.assert_allclose(results[0]["losses"], single_device_result["losses"], rtol=1e-5)


@pytest.mark.slow
def test_train_py_distributed_on_two_slurm_tasks_matches_one_process(tmp_path, data_dir):
    """`train.py --distributed` as Slurm starts it: two tasks, the coordinator found from the SLURM_* variables.

    Without a real joint run the second task would be refused by the workdir lock (exit 2); with a wrong global
    batch the losses would differ from the one-process run's.
    """
    single = str(tmp_path / "single")
    experiment.train_and_evaluate(Config(**TINY, workdir=single, data_dir=data_dir, refit_head=True))
    workdir = str(tmp_path / "distributed")
    args = cli_args(**TINY, workdir=workdir, data_dir=data_dir)
    for returncode, out, err in _slurm_tasks([*args, "--refit-head"], [*args, "--refit-head"]):
        assert returncode == 0, err[-3000:]
        assert "Epoch 2: Loss" in out and "Refitted the head of step 12" in out
    drop_seconds = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    ours, expected = drop_seconds(read_history(workdir, 2)), drop_seconds(read_history(single, 2))
    assert [r["epoch"] for r in ours] == [1, 2]
    for a, b in zip(ours, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    # The refit's training and validation rows gathered from both processes: the same layer as from one.
    (((kernel, bias),), record), (((one_kernel, one_bias),), one_record) = (
        read_refit(workdir, 12),
        read_refit(single, 12),
    )
    np.testing.assert_allclose(kernel, one_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias, one_bias, rtol=1e-4, atol=1e-6)
    scores = lambda r: {k: v for k, v in r.items() if isinstance(v, float)}  # noqa: E731
    assert scores(record) == pytest.approx(scores(one_record), rel=1e-5)
    assert {k: v for k, v in record.items() if k not in scores(record)} == {
        k: v for k, v in one_record.items() if k not in scores(one_record)
    }


@pytest.mark.slow
def test_a_task_that_fails_to_start_stops_its_peer_at_once_with_its_reason(tmp_path, data_dir):
    # Before, the peer waited two minutes for the failed task's devices and died with a traceback.
    args = cli_args(**TINY, workdir=str(tmp_path / "run"), data_dir=data_dir)
    started = time.monotonic()
    (first, _, first_err), (second, _, second_err) = _slurm_tasks(args, [*args, "--data-dir", "/proc/no-such-dir"])
    assert time.monotonic() - started < 90
    assert (first, second) == (2, 2), first_err[-3000:]
    assert "No such file or directory: '/proc/no-such-dir'" in second_err
    assert "process 1 of this run failed to start, so this one stops too: [Errno 2] No such file" in first_err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tasks_given_different_options_are_refused_by_name(tmp_path, data_dir):
    # Before, each task compiled its own step (here another learning rate) and the copies drifted apart silently.
    args = cli_args(**TINY, workdir=str(tmp_path / "run"), data_dir=data_dir)
    for returncode, _, err in _slurm_tasks(args, [*args, "--lr", "0.003", "--read-threads", "1"]):
        assert returncode == 2
        assert "the processes of this run were given different options: --lr; give every task the same" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_refit_on_two_slurm_tasks_reads_a_split_the_processes_share_unevenly(tmp_path, data_dir):
    """100 training images in batches of 16: the refit reads the training split's last batch padded, 4 real rows for
    the first task and none for the second (gathering the real rows alone, of different counts, crashed both)."""
    tiny = dict(TINY, num_train=100)  # training drops the remainder: 6 steps an epoch, as with 96
    single = str(tmp_path / "single")
    experiment.train_and_evaluate(Config(**tiny, workdir=single, data_dir=data_dir, refit_head=True))
    workdir = str(tmp_path / "distributed")
    args = [*cli_args(**tiny, workdir=workdir, data_dir=data_dir), "--refit-head"]
    for returncode, out, err in _slurm_tasks(args, args):
        assert returncode == 0, err[-3000:]
        assert "Refitted the head of step 12 on 100 training images" in out
    ((kernel, bias),), record = read_refit(workdir, 12)
    ((one_kernel, one_bias),), one_record = read_refit(single, 12)
    assert record["examples"] == one_record["examples"] == 100 and record["ridge"] == one_record["ridge"]
    # The features of batches of 8 rows per process against 16 in one differ in float32's last bits.
    np.testing.assert_allclose(kernel, one_kernel, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(bias, one_bias, rtol=1e-3, atol=1e-5)
    assert record["validation_r2_mean"] == pytest.approx(one_record["validation_r2_mean"], rel=1e-4)


def _slurm_tasks(*task_args: list[str]) -> list[tuple[int, str, str]]:
    """Runs `train.py --distributed` as Slurm starts it, one task per argument list (the coordinator found from
    the SLURM_* variables); (exit code, stdout, stderr) of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(len(task_args)))
    tasks = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--distributed", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **slurm, "SLURM_LOCALID": "0", "SLURM_PROCID": str(i), "JAX_COORDINATOR_PORT": port},
        )
        for i, args in enumerate(task_args)
    ]
    outputs = [task.communicate(timeout=240) for task in tasks]
    return [(task.returncode, out, err) for task, (out, err) in zip(tasks, outputs, strict=True)]


def test_checkpoint_round_trip_keeps_everything(tmp_path, mesh):
    class Dropped(nnx.Module):
        def __init__(self, rngs):
            self.mlp = MLP(12, [16], 3, rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.norm(self.mlp(x)))

    step = training.make_train_step(losses.mse, donate=False)
    state = training.TrainState.create(Dropped(nnx.Rngs(0)), optax.adam(1e-2))
    state, _ = step(state, training.shard_batch(make_batch(), mesh))
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(state, {"epoch": 1, "batch": 0}, validation_loss=0.5)
    checkpointer.wait()
    template = training.TrainState.create(Dropped(nnx.Rngs(42)), optax.adam(1e-2))
    restored, record = checkpointer.restore(template)
    assert record == {"epoch": 1, "batch": 0}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    # The next step (dropout mask included) is identical after a restore.
    after_original, m1 = step(state, training.shard_batch(make_batch(seed=5), mesh))
    after_restored, m2 = step(restored, training.shard_batch(make_batch(seed=5), mesh))
    assert float(m1["loss_sum"]) == float(m2["loss_sum"])
    with pytest.raises(ValueError, match=r"available steps: \[1\]"):
        checkpointer.restore(template, step=7)
    checkpointer.close()


def test_padded_evaluation_compiles_once_for_every_split_size(mesh):
    # 20 and 13 examples at batch 8: padded last batches keep one shape, so the eval step compiles once.
    state, eval_step = new_state(), training.make_eval_step(losses.mse, with_predictions=True)
    for rows in (20, 13):
        batch = make_batch(rows=rows)
        padding = (-rows) % 8
        padded = {key: np.concatenate([value, np.zeros_like(value[:padding])]) for key, value in batch.items()}
        padded["index"] = np.arange(rows + padding)
        batches = [{key: value[i : i + 8] for key, value in padded.items()} for i in range(0, rows + padding, 8)]
        result = training.evaluate(state, batches, eval_step, mesh, with_predictions=True)
        assert result["count"] == rows and len(result["predictions"]) == rows
    assert eval_step._cache_size() == 1


def test_params_ema_follows_its_recurrence_and_leaves_training_alone(mesh):
    step = training.make_train_step(losses.mse, donate=False)
    plain = new_state()
    averaged = training.TrainState.create(
        MLP(12, [16], 3, rngs=nnx.Rngs(0)), optax.chain(optax.adam(1e-2), training.params_ema(0.9))
    )
    expected = jax.tree.map(np.asarray, plain.params)
    for t in range(5):
        batch = training.shard_batch(make_batch(seed=t), mesh)
        plain, _ = step(plain, batch)
        averaged, _ = step(averaged, batch)
        rate = min(0.9, (1 + t) / (10 + t))  # the warm-up: early averages forget the initial weights fast
        expected = jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * np.asarray(p), expected, plain.params)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(averaged.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the average never feeds back into training
    evaluated = training.with_ema_params(averaged)
    for e, p in zip(jax.tree.leaves(expected), jax.tree.leaves(evaluated.params), strict=True):
        np.testing.assert_allclose(p, e, rtol=1e-6, atol=1e-7)
    assert training.with_ema_params(plain) is plain  # no average kept: the state itself
