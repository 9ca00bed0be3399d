"""jaxnets.refit: the last layer refitted by least squares on the features it reads."""

import operator
import re
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_experiment import write_roulette_csv

from conftest import TINY, cli_args, run_in_process
from jaxnets import evaluation, experiment, refit, training
from jaxnets.checkpoint import REFIT_DIR, read_refit
from jaxnets.config import Config
from jaxnets.models import MLP, Inception3
from jaxnets.report import describe_checkpoint


def test_without_a_ridge_a_linear_map_is_recovered_exactly_from_sums_added_batch_by_batch():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6)) * [1, 10, 100, 0.1, 1, 1] + 50  # scales far apart, far from 0
    kernel, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
    targets = features @ kernel + bias
    batches = [refit.NormalEquations.of(features[i : i + 32], targets[i : i + 32]) for i in range(0, 200, 32)]
    sums = batches[0]
    for more in batches[1:]:
        sums = jax.tree.map(operator.add, sums, more)
    assert sums.count == 200
    ((fitted_kernel, fitted_bias),) = sums.solve([0.0])
    np.testing.assert_allclose(fitted_kernel, kernel, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fitted_bias, bias, rtol=1e-7, atol=1e-7)


def test_a_large_ridge_leaves_the_targets_mean_and_the_ridge_is_relative_to_the_features_scale():
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(100, 4)), rng.normal(size=(100, 2)) + [5.0, -3.0]
    ((kernel, bias),) = refit.NormalEquations.of(features, targets).solve([1e9])
    assert np.abs(kernel).max() < 1e-8
    np.testing.assert_allclose(bias, targets.mean(axis=0), atol=1e-6)
    # Scaling the features scales the kernel back: the fit is the same.
    ((small, _),) = refit.NormalEquations.of(features, targets).solve([0.1])
    ((scaled, _),) = refit.NormalEquations.of(1000 * features, targets).solve([0.1])
    np.testing.assert_allclose(scaled * 1000, small, rtol=1e-8)
    # The closed form of ridge regression, (Xc'Xc + r I)^-1 Xc'Yc with r = 0.1 * trace(Xc'Xc) / 4.
    centred, targets_centred = features - features.mean(axis=0), targets - targets.mean(axis=0)
    gram = centred.T @ centred
    expected = np.linalg.solve(gram + 0.1 * np.trace(gram) / 4 * np.eye(4), centred.T @ targets_centred)
    np.testing.assert_allclose(small, expected, rtol=1e-10)


def test_no_rows_is_refused():
    with pytest.raises(ValueError, match="at least one example"):
        refit.NormalEquations.of(np.zeros((0, 3)), np.zeros((0, 2))).solve([0.0])


def test_the_head_taken_out_of_an_mlp_is_its_last_layer_and_gives_back_its_outputs():
    model = MLP(12, [8, 5], 3, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(2).normal(size=(4, 12)), jnp.float32)
    outputs = model(images)
    assert refit.head_layers(model) == [refit.last_layer(model)]
    last = refit.without_head(model)
    features = model(images)
    assert features.shape == (4, 5)
    np.testing.assert_allclose(features @ last.kernel[...] + last.bias[...], outputs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_features, widths", [((1024, 512), [2048, 1024, 512]), ((), [2048])])
def test_the_head_of_inception3_is_its_fc_and_its_last_layer_the_heads_last(head_features, widths):
    model = Inception3(3, in_channels=1, head_features=head_features, rngs=nnx.Rngs(0))
    layers = refit.head_layers(model)
    assert [layer.kernel.shape for layer in layers] == [(n, m) for n, m in zip(widths, [*widths[1:], 3], strict=True)]
    assert refit.last_layer(model) is layers[-1] is (model.fc if not head_features else model.fc.layers[-1])
    fc = model.fc
    assert refit.without_head(model) is fc and not isinstance(model.fc, (nnx.Linear, nnx.Sequential))


class _Headed(nnx.Module):
    """A body and a head with a hidden layer (as Inception3's CosmoML head: model.fc, Linear, ReLU, Linear)."""

    def __init__(self, rngs: nnx.Rngs):
        self.body = nnx.Linear(6, 16, rngs=rngs)
        self.fc = nnx.Sequential(nnx.Linear(16, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 2, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(jax.nn.relu(self.body(x.reshape(len(x), -1))))


def test_with_head_layers_replaces_the_last_layer_or_the_whole_head_and_refuses_what_does_not_fit():
    state = training.TrainState.create(MLP(12, [8], 3, rngs=nnx.Rngs(0)), optax.adam(1e-3))
    kernel, bias = np.arange(24.0).reshape(8, 3) / 10, np.array([1.0, 2.0, 3.0])
    replaced = refit.with_head_layers(state, [(kernel, bias)])
    images = jnp.asarray(np.random.default_rng(3).normal(size=(5, 12)), jnp.float32)
    features = refit.make_feature_step()(state, {"image": images})
    np.testing.assert_allclose(replaced.model()(images), features @ kernel + bias, rtol=1e-5, atol=1e-5)
    first = lambda s: s.params["layers"][0]["kernel"][...]  # noqa: E731
    np.testing.assert_array_equal(first(replaced), first(state))
    with pytest.raises(ValueError, match=r"kernel \(3, 8\) .* does not fit the model's \(8, 3\)"):
        refit.with_head_layers(state, [(kernel.T, bias)])
    with pytest.raises(ValueError, match="2 refitted layers do not fit a head of 1 Linear layers"):
        refit.with_head_layers(state, [(kernel, bias)] * 2)
    # A head with a hidden layer: both of its Linear layers replaced, the body kept.
    headed = training.TrainState.create(_Headed(nnx.Rngs(0)), optax.adam(1e-3))
    layers = [(np.full((16, 8), 0.1), np.zeros(8)), (np.full((8, 2), 0.5), np.array([1.0, -1.0]))]
    model = refit.with_head_layers(headed, layers).model()
    body = jax.nn.relu(headed.model().body(images[:, :6]))
    expected = np.maximum(np.asarray(body) @ layers[0][0], 0) @ layers[1][0] + layers[1][1]
    np.testing.assert_allclose(model(images[:, :6]), expected, rtol=1e-5, atol=1e-5)


def test_fine_tuning_the_head_fits_a_head_of_the_same_shape_and_gives_the_same_heads_every_time():
    rng = np.random.default_rng(6)
    student = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    teacher = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(2)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(3)))
    inputs = rng.normal(size=(512, 16)).astype(np.float32)
    targets = np.asarray(teacher(inputs))
    losses, heads = [], []

    def on_epoch(epoch, head):
        losses.append(float(np.mean((np.asarray(head(inputs)) - targets) ** 2)))
        heads.append(head)

    start = float(np.mean((np.asarray(student(inputs)) - targets) ** 2))
    refit.fine_tune_head(student, inputs, targets, on_epoch, epochs=100, lr=1e-2)
    assert len(losses) == 100 and losses[-1] < 0.05 * start
    # The module passed in keeps its weights; the same call gives the same heads.
    np.testing.assert_allclose(float(np.mean((np.asarray(student(inputs)) - targets) ** 2)), start)
    again = []
    refit.fine_tune_head(student, inputs, targets, lambda epoch, head: again.append(head(inputs)), epochs=3, lr=1e-2)
    np.testing.assert_array_equal(again[-1], heads[2](inputs))


def _batches(images, targets, size=8, *, raw=True):
    """Evaluation batches as the pipeline gives them (images [b, height, width, channels]): the last padded, with
    mask 0 and zero targets."""
    for start in range(0, len(images), size):
        image, target = images[start : start + size], targets[start : start + size]
        pad = size - len(image)
        batch = {
            "image": np.pad(image, ((0, pad), (0, 0), (0, 0), (0, 0))),
            "target": np.pad(target, ((0, pad), (0, 0))),
            "mask": np.r_[np.ones(len(image)), np.zeros(pad)].astype(np.float32),
        }
        yield dict(batch, raw_target=batch["target"]) if raw else batch


def _r2_mean(outputs, true):
    return float(np.mean(1 - ((outputs[0] - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)))


def test_the_refit_recovers_targets_linear_in_the_features_and_scores_them_on_validation():
    state = training.TrainState.create(MLP(6, [16], 2, rngs=nnx.Rngs(0)), optax.adam(1e-3))
    rng = np.random.default_rng(4)
    images = rng.normal(size=(61, 2, 3, 1)).astype(np.float32)  # 61: the last batch padded
    features = np.asarray(refit.make_feature_step()(state, {"image": images}), np.float64)
    targets = features @ rng.normal(size=(16, 2)) + [3.0, -1.0]  # what the last layer could say, but does not
    mesh = training.data_mesh()
    found = refit.refit_head(
        training.replicate(state, mesh),
        _batches(images[:45], targets[:45]),
        _batches(images[45:], targets[45:]),
        _r2_mean,
        mesh,
    )
    assert found.examples == 45 and found.method == "least squares" and found.ridge == 0.0 and found.epochs is None
    assert found.trained_score < 0 and found.score == pytest.approx(1.0, abs=1e-6)
    predicted = refit.with_head_layers(state, found.layers).model()(images)
    np.testing.assert_allclose(predicted, targets, rtol=1e-4, atol=1e-4)


def test_a_layer_as_trained_that_no_fit_beats_is_kept():
    state = training.TrainState.create(MLP(6, [16], 2, rngs=nnx.Rngs(0)), optax.adam(1e-3))
    rng = np.random.default_rng(5)
    images = rng.normal(size=(40, 2, 3, 1)).astype(np.float32)
    targets = np.asarray(state.model()(images), np.float64)  # the layer as trained is exact
    # Batches standardised by hand carry no raw targets: the validation score reads "target".
    found = refit.refit_head(
        state,
        _batches(images[:30], targets[:30], raw=False),
        _batches(images[30:], targets[30:], raw=False),
        _r2_mean,
        training.data_mesh(),
    )
    assert found.method is None and found.ridge is None and found.score == found.trained_score == pytest.approx(1.0)
    ((kernel, _),) = found.layers
    np.testing.assert_array_equal(kernel, np.asarray(refit.last_layer(state.model()).kernel[...], np.float64))


def test_a_head_with_a_hidden_layer_is_also_fine_tuned_and_the_validation_split_chooses():
    state = training.TrainState.create(_Headed(nnx.Rngs(0)), optax.adam(1e-3))
    teacher = _Headed(nnx.Rngs(0))
    teacher.fc.layers[0].kernel[...] += 0.01 * jax.random.normal(jax.random.key(1), (16, 8))
    rng = np.random.default_rng(7)
    images = rng.normal(size=(1100, 2, 3, 1)).astype(np.float32)
    targets = np.asarray(teacher(images), np.float64)  # the hidden layer moved: no last layer alone can say it
    mesh = training.data_mesh()

    def found(epochs):
        return refit.refit_head(
            state,
            _batches(images[:1024], targets[:1024], 64),
            _batches(images[1024:], targets[1024:]),
            _r2_mean,
            mesh,
            epochs=epochs,
        )

    solved, tuned = found(0), found(30)
    assert solved.method == "least squares" and len(solved.layers) == 1
    assert tuned.method == "fine-tuned" and 1 <= tuned.epochs <= 30 and len(tuned.layers) == 2
    assert tuned.trained_score < solved.score < tuned.score
    # What it chose scores as it said: the head replaced, evaluated as evaluate.py would.
    outputs = np.asarray(refit.with_head_layers(state, tuned.layers).model()(images[1024:]), np.float64)
    assert _r2_mean([outputs], targets[1024:]) == pytest.approx(tuned.score, abs=1e-6)


def test_a_signal_during_the_refit_stops_it_with_the_signals_exit_code():
    stop = types.SimpleNamespace(received=None, exit_code=128 + signal.SIGTERM)
    batches = experiment._refit_progress(iter(range(5)), 5, "refit", stop, show=False)
    assert next(batches) == 0
    stop.received = signal.SIGTERM
    with pytest.raises(experiment.RunError, match="stopped during the refit of the head") as error:
        next(batches)
    assert error.value.exit_code == 143
    # The head's fine-tuning: stopped at the end of the epoch the signal arrives in.
    stop.received = None
    with experiment._epoch_progress(30, "refit", stop, show=False) as each_epoch:
        each_epoch(1)
        stop.received = signal.SIGINT
        with pytest.raises(experiment.RunError, match="run the same command again to refit") as error:
            each_epoch(2)
    assert error.value.exit_code == 143  # the exit code StopSignals chose for the signal


def _r2_means(workdir, **options) -> tuple[float, dict]:
    """The mean R² over the targets evaluate.py reports for the validation split (with options), and its report."""
    report = evaluation.evaluate_run(str(workdir), split="validation", **options)
    return float(np.nanmean([p["r2"] for p in report["parameters"].values()])), report


def test_train_py_refits_the_best_checkpoint_and_evaluate_py_scores_what_it_chose(tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    args = cli_args(**TINY, workdir=workdir, data_dir=data_dir)
    trained = run_in_process(capsys, "train.py", *args, "--refit-head")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Refitted the head of step 12 on 96 training images: last layer refitted by least squares (ridge" in (
        trained.stdout
    )
    ((kernel, bias),), record = read_refit(str(workdir), 12)
    assert kernel.shape == (32, 7) and bias.shape == (7,)  # TINY's MLP: 32 hidden; 6 lens targets, theta as cos, sin
    assert record["examples"] == 96 and record["views"] == 1 and record["ridge"] in refit.RIDGES
    assert record["method"] == "least squares" and record["layers"] == 1 and record["epochs"] is None
    assert record["validation_r2_mean"] > record["validation_r2_mean_as_trained"]
    # evaluate.py uses the refit by default, and scores the validation split as the refit chose on it.
    refitted, report = _r2_means(workdir)
    assert refitted == pytest.approx(record["validation_r2_mean"], rel=1e-4)
    assert report["refitted_head"] == record
    assert "last layer refitted by least squares (ridge" in describe_checkpoint(report)
    as_trained, report = _r2_means(workdir, refit=False)
    assert as_trained == pytest.approx(record["validation_r2_mean_as_trained"], rel=1e-4)
    assert report["refitted_head"] is None
    # The same command again: nothing to train, and the refit is already there.
    again = run_in_process(capsys, "train.py", *args, "--refit-head")
    assert again.returncode == 0 and "The head of step 12 is already refitted" in again.stdout
    # A refit saved before the whole head could be refitted (its last layer as "layer" in refitted_last_layer):
    # evaluate.py still uses it.
    legacy = ocp.CheckpointManager(str(workdir / "refitted_last_layer"))
    legacy.save(
        12,
        args=ocp.args.Composite(
            layer=ocp.args.StandardSave({"kernel": kernel, "bias": bias}),
            record=ocp.args.JsonSave({k: v for k, v in record.items() if k not in ("method", "epochs", "layers")}),
        ),
    )
    legacy.wait_until_finished()
    legacy.close()
    shutil.move(workdir / REFIT_DIR, tmp_path / "moved")
    assert _r2_means(workdir)[0] == pytest.approx(refitted, rel=1e-6)
    assert "last layer refitted by least squares (ridge" in describe_checkpoint(_r2_means(workdir)[1])
    shutil.rmtree(workdir / "refitted_last_layer")
    shutil.move(tmp_path / "moved", workdir / REFIT_DIR)
    # A damaged refit: evaluated as trained, with a warning.
    for path in (workdir / REFIT_DIR / "12" / "head").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="refitted head of step 12 .* is damaged.*evaluating the head as trained"):
        damaged, _ = _r2_means(workdir)
    assert damaged == pytest.approx(as_trained, rel=1e-6)
    # Trained on: the new best checkpoint is refitted in place of the damaged one, and only it is kept.
    longer = run_in_process(capsys, "train.py", *args, "--refit-head", "--epochs", "3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "Refitted the head of step 18" in longer.stdout
    assert read_refit(str(workdir), 12) is None and read_refit(str(workdir), 18)[1]["step"] == 18
    assert _r2_means(workdir)[1]["refitted_head"]["step"] == 18


def test_a_refit_is_on_by_default_for_cosmosim_data_and_scored_in_evaluate_pys_eight_views(tmp_path, capsys):
    csv_file = write_roulette_csv(tmp_path / "csv", num_rows=60)
    workdir = tmp_path / "run"
    tiny = dict(TINY, num_train=None, num_validation=None, num_test=None, image_size=None)
    args = cli_args(**{k: v for k, v in tiny.items() if v is not None}, workdir=workdir, data_dir=tmp_path / "tfds")
    trained = run_in_process(
        capsys, "train.py", "--data", csv_file, "--targets", "sigma,xiX,xiY,alpha[*][*],beta[*][*]", *args
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert Config.load(str(workdir)).refit_head is True
    found = re.search(r"validation R² mean \(?(-?[\d.]+)(?: -> (-?[\d.]+))?, 8 views averaged", trained.stdout)
    assert found, trained.stdout[-2000:]
    chosen = float(found.group(2) or found.group(1))
    assert _r2_means(workdir)[0] == pytest.approx(chosen, abs=1e-4)


def test_refit_head_is_refused_for_classification(tmp_path, capsys, data_dir):
    args = cli_args(**TINY, workdir=tmp_path / "run", data_dir=data_dir)
    refused = run_in_process(capsys, "train.py", *args, "--task", "classification", "--refit-head")
    assert refused.returncode == 2
    assert "--refit-head applies to regression; dataset 'lens' is classification" in refused.stderr
    assert not (tmp_path / "run").exists()
