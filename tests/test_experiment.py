"""End to end: train.py and evaluate.py on a tiny lens run, resume, and refusal of incompatible runs."""

import csv
import dataclasses
import gc
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from conftest import TINY, cli_args, run_in_process, run_script, tiny_config
from jaxnets import experiment, losses, step_cache, training
from jaxnets.checkpoint import Checkpointer
from jaxnets.config import Config
from jaxnets.data import Dataset, lens, pipeline
from jaxnets.data.targets import TargetEncoding, parse_weights


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    workdir, data_dir = tmp / "run", tmp / "data"
    trained = run_script("train.py", *cli_args(**TINY, workdir=workdir, data_dir=data_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_script("evaluate.py", "--workdir", workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return workdir, trained.stdout, evaluated.stdout


def test_target_weights_default_to_the_lens_datasets_and_are_checked(tmp_path):
    config = tiny_config(tmp_path)
    dataset = experiment.load_data(config)
    assert experiment.target_weights(config, dataset) == parse_weights(lens.LOSS_WEIGHTS) == {"theta": 2.0}
    assert experiment.target_weights(dataclasses.replace(config, target_weights=()), dataset) == {}
    no_theta = dataclasses.replace(config, targets=("x", "y"))
    assert experiment.target_weights(no_theta, experiment.load_data(no_theta)) == {}  # the default needs theta
    sigma = dataclasses.replace(config, target_weights=("sigma:2",))
    assert experiment.target_weights(sigma, dataset) == {"sigma": 2.0}
    with pytest.raises(experiment.RunError, match=r"--target-weights: weights for \['sigma3'\], which are not"):
        experiment.target_weights(dataclasses.replace(config, target_weights=("sigma3:2",)), dataset)
    with pytest.raises(experiment.RunError, match=r"--target-weights: target weight 'theta:-4'"):
        experiment.target_weights(dataclasses.replace(config, target_weights=("theta:-4",)), dataset)
    classify = dataclasses.replace(config, task="classification")
    classes = experiment.load_data(classify)
    assert experiment.target_weights(classify, classes) == {}  # the default weighs regression targets only
    with pytest.raises(experiment.RunError, match="--target-weights applies to regression targets; dataset 'lens' is"):
        experiment.target_weights(dataclasses.replace(classify, target_weights=("theta:4",)), classes)


def test_angle_axes_default_to_the_lens_datasets_and_are_checked(tmp_path):
    config = tiny_config(tmp_path)
    dataset = experiment.load_data(config)
    assert experiment.angle_axes(config, dataset) == {"theta": ("sigma2", "sigma")}
    assert experiment.angle_axes(dataclasses.replace(config, angle_axes=()), dataset) == {}
    no_sigma2 = dataclasses.replace(config, targets=("x", "sigma", "theta"))
    assert experiment.angle_axes(no_sigma2, experiment.load_data(no_sigma2)) == {}  # the default needs its targets
    with pytest.raises(experiment.RunError, match=r"--angle-axes: angle axes theta:y/sigma3: theta must be an angle"):
        experiment.angle_axes(dataclasses.replace(config, angle_axes=("theta:y/sigma3",)), dataset)
    with pytest.raises(experiment.RunError, match=r"--angle-axes: angle axes 'theta': write angle:minor/major"):
        experiment.angle_axes(dataclasses.replace(config, angle_axes=("theta",)), dataset)


def test_dropout_defaults_to_none_for_regression_and_torchvisions_for_classification(tmp_path):
    config = tiny_config(tmp_path, model="inception3", image_size=75)
    dataset = experiment.load_data(config)
    assert experiment.dropout(config, dataset) == 0.0  # noise on the fitted outputs themselves
    assert experiment.build_model(config, dataset).dropout.rate == 0.0
    assert experiment.dropout(dataclasses.replace(config, dropout=0.3), dataset) == 0.3
    classify = dataclasses.replace(config, task="classification")
    assert experiment.dropout(classify, experiment.load_data(classify)) == 0.5


def test_the_loss_and_lr_default_to_huber_and_1e_3_for_roulette_amplitudes_only():
    def dataset(*targets: str, task: str = "regression") -> Dataset:
        return Dataset(name="csv-problem", task=task, splits={}, image_shape=(8, 8, 1), target_names=targets)

    config = Config()
    amplitudes, plain = dataset("sigma", "xiX", "alpha[0][1]", "beta[2][3]"), dataset("sigma", "xiX", "alpha", "beta2")
    classes = dataset("lens", "point", task="classification")
    assert experiment.loss_function(config, amplitudes) is losses.huber
    assert experiment.loss_function(config, plain) is losses.mse
    assert experiment.loss_function(config, classes) is losses.cross_entropy
    explicit = dataclasses.replace(config, loss="mse")
    assert experiment.loss_function(explicit, dataset("alpha[0][1]")) is losses.mse
    lrs = [experiment.with_data_defaults(config, data).lr for data in (amplitudes, plain, classes)]
    assert lrs == [1e-3, 2e-3, 2e-3]
    assert experiment.with_data_defaults(dataclasses.replace(config, lr=5e-4), amplitudes).lr == 5e-4
    with pytest.raises(ValueError, match="with_data_defaults"):
        experiment.build_optimizer(config, 1)  # an unresolved config names the step it missed


def test_the_train_step_compiles_before_the_weights_are_made(tmp_path, monkeypatch):
    """The step is compiled for the state's shapes and the weights and Adam's moments are made after it, so the
    compiler's memory and theirs never count towards the peak together (docs/cpu_performance.md, "Peak memory")."""
    events = []
    create = training.TrainState.create

    def recorded_create(model, tx):
        state = create(model, tx)
        if not isinstance(jax.tree.leaves(state.params)[0], jax.core.Tracer):  # traced for the shapes: no weights
            events.append("weights")
        return state

    lower = experiment._lower_train_step

    def recorded_lower(*args):
        compile_step = lower(*args)

        def compiled():
            step = compile_step()
            events.append("compiled")
            return step

        return compiled

    monkeypatch.setattr(training.TrainState, "create", recorded_create)
    monkeypatch.setattr(experiment, "_lower_train_step", recorded_lower)
    result = experiment.train_and_evaluate(tiny_config(tmp_path, epochs=1))
    assert events == ["compiled", "weights"]
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["loss"])


def test_images_the_model_cannot_take_are_refused_before_anything_is_written(tmp_path):
    config = tiny_config(tmp_path, model="inception3")  # 32 px images: Inception3 needs 75
    with pytest.raises(
        experiment.RunError, match=r"the Inception3 model cannot take this dataset's images \(32, 32, 1\)"
    ):
        experiment.train_and_evaluate(config)
    assert not (tmp_path / "run").exists()


def test_the_train_step_traces_with_the_garbage_collector_paused_and_restored_after(tmp_path, monkeypatch):
    seen = []

    def trace(batch):
        seen.append(gc.isenabled())
        if batch == "bad":
            raise ZeroDivisionError

    class TrainStep:  # without a compilation cache: jit's own trace
        def lower(self, state, batch):
            trace(batch)
            return self

        compile = None

    monkeypatch.setattr(training, "make_train_step", lambda loss_fn: TrainStep())
    monkeypatch.setattr(step_cache, "export_step", lambda step, state, batch: trace(batch))  # with one: the export
    monkeypatch.setattr(step_cache, "lower_exported", lambda *args, **kwargs: None)
    monkeypatch.setattr(step_cache, "step_key", lambda *args: "key")
    monkeypatch.setattr(step_cache.StepCache, "save", lambda *args: None)
    for cache in ("", str(tmp_path)):
        config = tiny_config(tmp_path, compilation_cache=cache)
        experiment._lower_train_step(config, None, 6, None, {})
        with pytest.raises(ZeroDivisionError):
            experiment._lower_train_step(config, None, 6, None, "bad")
        gc.disable()  # a program that turned it off keeps it off
        try:
            experiment._lower_train_step(config, None, 6, None, {})
            assert not gc.isenabled()
        finally:
            gc.enable()
    assert seen == [False] * 6 and gc.isenabled()


def test_a_run_compiles_its_train_step_with_the_garbage_collector_paused(tmp_path, monkeypatch):
    seen, lower = [], experiment._lower_train_step

    def recording(*args):
        compile_step = lower(*args)
        return lambda: seen.append(gc.isenabled()) or compile_step()

    monkeypatch.setattr(experiment, "_lower_train_step", recording)
    experiment.train_and_evaluate(tiny_config(tmp_path, epochs=1))
    assert seen == [False] and gc.isenabled()


def test_a_run_saves_the_data_defaults_it_trained_with_and_keeps_them(tmp_path, monkeypatch):
    # A later version choosing another default (here: l1 for every dataset) must not change how a saved run is
    # evaluated or resumed: before the run saved them, its config.json held null and the new default applied.
    config = tiny_config(tmp_path, epochs=1, lr=None)
    experiment.train_and_evaluate(config)
    saved = Config.load(config.workdir)
    written = ("mse", 0.0, ("theta:2.0",), ("theta:sigma2/sigma",), 2e-3, "linear")
    assert (saved.loss, saved.dropout, saved.target_weights, saved.angle_axes, saved.lr, saved.pixel_scale) == written
    monkeypatch.setattr(experiment, "default_loss", lambda dataset: "l1")
    monkeypatch.setattr(experiment, "default_lr", lambda dataset: 0.5)
    assert experiment.loss_function(saved, experiment.load_data(saved)) is losses.mse
    experiment.train_and_evaluate(dataclasses.replace(config, epochs=2))  # resumed without --loss or --lr
    assert (Config.load(config.workdir).loss, Config.load(config.workdir).lr) == ("mse", 2e-3)
    # A run saved before the defaults were written out (null) resumes, with today's defaults.
    old = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**old, "loss": None, "target_weights": None}))
    experiment.train_and_evaluate(dataclasses.replace(config, epochs=3))
    assert Config.load(config.workdir).loss == "l1"


def test_data_seed_keeps_the_data_while_seed_varies(tmp_path):
    from test_cosmosim import write_dataset

    csv_file, _, _ = write_dataset(tmp_path, num_rows=40)

    def split_rows(**seeds):
        config = Config(data=(str(csv_file),), targets=("x", "y"), data_dir=str(tmp_path / "tfds"), **seeds)
        return experiment.load_data(config).metadata["split_rows"]

    assert split_rows(seed=1, data_seed=0) == split_rows(seed=0) != split_rows(seed=1)


def test_rotations_apply_to_cosmosim_targets_with_rules_and_are_refused_elsewhere():
    def dataset(name, *targets, shape=(8, 8, 1)):
        return Dataset(name=name, task="regression", splits={}, image_shape=shape, target_names=targets)

    roulette = ("sigma", "xiX", "xiY", "alpha[0][1]", "beta[0][1]", "theta")
    cases = [
        (dataset("csv:sie", *roulette), True),
        (dataset("csv:other", "sigma", "flux"), False),  # flux: no rule known
        (dataset("csv:wide", *roulette, shape=(8, 12, 1)), False),  # not square
        (dataset("lens", "x", "y", "sigma"), False),  # the built-in lens data is not CosmoSim's
    ]
    assert [experiment.has_symmetry(data) for data, _ in cases] == [expected for _, expected in cases]
    assert Config().augment is False  # an option: evaluate.py's averaging is the default use
    assert experiment._augment_rule(Config(augment=True), cases[0][0]).names == roulette
    assert experiment._augment_rule(Config(), cases[0][0]) is None
    with pytest.raises(experiment.RunError, match="--augment: no rotation or mirror rule for the targets flux"):
        experiment._augment_rule(Config(augment=True), cases[1][0])
    with pytest.raises(experiment.RunError, match="--augment: rotations apply to square images; 'csv:wide'"):
        experiment._augment_rule(Config(augment=True), cases[2][0])
    with pytest.raises(experiment.RunError, match="--augment: rotations and mirrors apply to regression on CosmoSim"):
        experiment._augment_rule(Config(augment=True), cases[3][0])


def test_the_pixel_scale_defaults_to_log_for_cosmosim_images_only():
    def dataset(name):
        return Dataset(name=name, task="regression", splits={}, image_shape=(8, 8, 1), target_names=("x",))

    cosmosim, lens = dataset("csv:sie"), dataset("lens")
    assert [experiment.with_data_defaults(Config(), d).pixel_scale for d in (cosmosim, lens)] == ["log", "linear"]
    assert experiment.with_data_defaults(Config(pixel_scale="linear"), cosmosim).pixel_scale == "linear"
    assert experiment.with_data_defaults(Config(pixel_scale="log"), lens).pixel_scale == "log"


def test_polar_amplitudes_pair_the_roulette_targets_and_are_refused_without_them():
    def dataset(*targets):
        return Dataset(name="csv:sie", task="regression", splits={}, image_shape=(8, 8, 1), target_names=targets)

    roulette = dataset("sigma", "alpha[1][0]", "alpha[0][1]", "beta[0][1]")
    assert experiment.polar_amplitudes(Config(), roulette) == ()
    assert experiment.with_data_defaults(Config(), roulette).amplitudes == "plain"
    polar = Config(amplitudes="polar")
    assert experiment.polar_amplitudes(polar, roulette) == (("alpha[1][0]", None), ("alpha[0][1]", "beta[0][1]"))
    outputs = experiment.output_names(roulette, polar)  # each column named in test_targets
    assert len(outputs) == 6 and outputs[1:3] == ("alpha[1][0] log magnitude", "alpha[1][0] sign")
    assert experiment.output_names(roulette) == roulette.target_names
    with pytest.raises(experiment.RunError, match="--amplitudes polar: the regression targets of 'csv:sie' include no"):
        experiment.polar_amplitudes(polar, dataset("sigma", "xiX"))


def write_roulette_csv(folder, num_rows=40):
    """A CosmoSim-like roulette CSV (sigma, xiX, xiY, alpha/beta[0][1]) with 16 px square random images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with open(folder / "roulette.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "sigma", "xiX", "xiY", "alpha[0][1]", "beta[0][1]"])
        for i in range(num_rows):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(folder / f"images/{i}.png")
            writer.writerow([f"images/{i}.png", *rng.normal(size=5).round(4)])
    return folder / "roulette.csv"


@pytest.mark.slow
def test_a_cosmosim_run_trains_augmented_and_evaluates_over_the_eight_views(
    tmp_path, finished_run, capsys, monkeypatch
):
    csv_file = write_roulette_csv(tmp_path / "csv")
    workdir = tmp_path / "run"
    tiny = dict(TINY, num_train=None, num_validation=None, num_test=None, image_size=None, epochs=1)
    args = cli_args(**{k: v for k, v in tiny.items() if v is not None}, workdir=workdir, data_dir=tmp_path / "tfds")
    targets = "sigma,xiX,xiY,alpha[*][*],beta[*][*]"
    trained = run_in_process(capsys, "train.py", "--data", csv_file, "--targets", targets, "--augment", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert Config.load(str(workdir)).augment is True
    reads, read = [], pipeline.batches
    monkeypatch.setattr(
        pipeline, "batches", lambda data, split, *a, **k: reads.append(split) or read(data, split, *a, **k)
    )
    averaged = run_in_process(capsys, "evaluate.py", "--workdir", workdir)
    assert averaged.returncode == 0, averaged.stderr[-3000:]
    assert reads == ["test"]  # the split read once, each batch predicted in the 8 views in turn
    assert "averaged over 8 rotations and mirrors" in averaged.stdout
    report = json.loads((workdir / "eval_test.json").read_text())
    single = run_in_process(capsys, "evaluate.py", "--workdir", workdir, "--no-tta")
    assert single.returncode == 0 and "rotations" not in single.stdout
    single_report = json.loads((workdir / "eval_test.json").read_text())
    assert (report["views"], single_report["views"]) == (8, 1)
    assert report["parameters"]["xiX"]["mae"] != single_report["parameters"]["xiX"]["mae"]
    lens_workdir, _, _ = finished_run
    refused = run_in_process(capsys, "evaluate.py", "--workdir", lens_workdir, "--tta")
    assert refused.returncode == 2
    assert "--tta: rotations and mirrors apply to regression on CosmoSim data; 'lens' is not" in refused.stderr


@pytest.mark.slow
def test_a_run_trains_and_reports_with_the_weighted_encoding(finished_run):
    # The default run weighs theta (lens.LOSS_WEIGHTS): its saved encoding has theta's columns at sqrt(weight) times
    # the plain scale, and the report decodes the predictions with it (the tests above check the report against
    # the CSV).
    workdir, _, _ = finished_run
    config = Config.load(str(workdir))
    dataset = experiment.load_data(config)
    template = training.TrainState.create(
        experiment.build_model(config, dataset), experiment.build_optimizer(config, 6)
    )
    _, record = Checkpointer(str(workdir), read_only=True).restore(template)
    saved, plain = TargetEncoding.from_json(record["targets"]), dataset.target_encoding()
    assert saved.axis_ratios == (("theta", "sigma2", "sigma"),)
    ellipses = dataset.target_encoding(axis_ratios={"theta": ("sigma2", "sigma")})
    scale = np.sqrt(parse_weights(lens.LOSS_WEIGHTS)["theta"])
    np.testing.assert_allclose(saved.std, ellipses.std / np.array([1, 1, 1, 1, 1, scale, scale]), rtol=1e-6)
    np.testing.assert_allclose(saved.mean, ellipses.mean)
    assert not np.allclose(ellipses.std[-2:], plain.std[-2:])  # the ellipticity changed theta's columns


@pytest.mark.slow
def test_train_prints_the_seed_lines_and_writes_the_run(finished_run):
    workdir, stdout, _ = finished_run
    assert "Epoch 1: Loss = " in stdout and "Epoch 2: Loss = " in stdout
    history = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["validation_loss"]) for h in history)
    assert (workdir / "loss_curve.png").stat().st_size > 1000
    assert Config.load(str(workdir)).model == "mlp"


@pytest.mark.slow
def test_evaluate_report_matches_its_predictions(finished_run):
    workdir, _, stdout = finished_run
    report = json.loads((workdir / "eval_test.json").read_text())
    assert report["count"] == 20 and report["split"] == "test"
    assert "R²" in stdout and "einsteinR" in stdout
    with open(workdir / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == list(range(20))  # every example, once
    # The (true) column is the dataset's own raw parameters: standardisation (and the angle encoding) undone.
    test_split = experiment.load_data(Config.load(str(workdir))).splits["test"]
    names = list(report["parameters"])
    for r in rows:
        expected = test_split[int(r["index"])]["target"]
        np.testing.assert_allclose([float(r[f"{n} (true)"]) for n in names], expected, rtol=1e-6)
    assert report["parameters"]["theta"]["period"] == pytest.approx(np.pi)  # the lens theta is an angle
    for name, values in report["parameters"].items():
        true = np.array([float(r[f"{name} (true)"]) for r in rows])
        predicted = np.array([float(r[f"{name} (predicted)"]) for r in rows])
        error, spread = predicted - true, true - true.mean()
        if "period" in values:  # the shorter way round, and deviations from the circular mean
            period = values["period"]
            error = (error + period / 2) % period - period / 2
            turn = true * 2 * np.pi / period
            mean = np.arctan2(np.sin(turn).mean(), np.cos(turn).mean()) * period / (2 * np.pi)
            spread = (true - mean + period / 2) % period - period / 2
        r2 = 1 - np.sum(error**2) / np.sum(spread**2)
        assert values["r2"] == pytest.approx(r2, rel=1e-4, abs=1e-5)
        assert values["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-4)
    assert (workdir / "predictions_test.png").stat().st_size > 1000
    assert "filename" not in rows[0]  # the built-in lens data has no image files to name


def _params(workdir):
    config = Config.load(str(workdir))
    dataset = experiment.load_data(config)
    template = training.TrainState.create(
        experiment.build_model(config, dataset), experiment.build_optimizer(config, 6)
    )
    state, _ = Checkpointer(str(workdir), read_only=True).restore(template)
    return jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)


@pytest.mark.parametrize("cached", [False, True])  # with the step cache, the resumed run reads straight's step
def test_resume_gives_identical_parameters_and_history(tmp_path, cached):
    cache = str(tmp_path / "cache") if cached else ""
    straight = tiny_config(tmp_path, workdir=str(tmp_path / "straight"), compilation_cache=cache)
    experiment.train_and_evaluate(straight)
    split = tiny_config(tmp_path, workdir=str(tmp_path / "split"), epochs=1, compilation_cache=cache)
    experiment.train_and_evaluate(split)
    experiment.train_and_evaluate(dataclasses.replace(split, epochs=2))
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "split"), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = [[json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("straight", "split")]
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1])
    if cached:  # two programs (1 and 2 epochs of schedule): the resumed run took straight's
        assert len(list((tmp_path / "cache" / step_cache.SUBDIRECTORY).iterdir())) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=-1.0), "--lr must be a positive number; got -1.0"),  # trained by gradient ascent before
        (dict(lr=0.0), "--lr must be a positive number; got 0.0"),
        (dict(lr=float("nan")), "--lr must be a positive number; got nan"),
        (dict(epochs=0), "--epochs must be at least 1; got 0"),  # said "Run saved" with nothing trained
        (dict(weight_decay=-0.1), "--weight-decay must be 0 or more; got -0.1"),
        (dict(ema=1.0), r"--ema must be 0 \(off\) or a decay in \(0, 1\); got 1.0"),
        (dict(dropout=1.5), r"--dropout must be a probability in \[0, 1\); got 1.5"),
        (dict(hidden=(32, 0)), "--hidden must be layer sizes of at least 1; got 32,0"),  # ZeroDivisionError before
        (dict(model="inception3", head_features=(-3,)), "--head-features must be layer sizes of at least 1; got -3"),
        (dict(freeze_backbone_epochs=-1), "--freeze-backbone-epochs must be 0 or more; got -1"),
        # Built the data, then said only "lens has no 'validation' split; it has train, test".
        (
            dict(num_validation=0),
            "--num-validation must be at least 1: training picks its best checkpoint on the validation split; got 0",
        ),
    ],
)
def test_an_option_out_of_range_is_refused_before_anything_is_written(tmp_path, change, message):
    with pytest.raises(experiment.RunError, match=f"^{message}$") as refused:
        experiment.train_and_evaluate(tiny_config(tmp_path, **change))
    assert refused.value.exit_code == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_incompatible_workdir_is_refused_with_the_differences(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    experiment.train_and_evaluate(config)
    with pytest.raises(experiment.RunError, match=r"hidden: saved 32, requested 64.*--workdir"):
        experiment.train_and_evaluate(dataclasses.replace(config, hidden=(64,)))


def test_a_resume_that_adds_target_weights_names_the_saved_none(tmp_path):
    # The saved run's data defaults are written out, () for "no weights": the message says '' as the CLI writes it.
    config = tiny_config(tmp_path, epochs=1, target_weights=())
    experiment.train_and_evaluate(config)
    with pytest.raises(experiment.RunError, match=r"target_weights: saved '', requested theta:4.0"):
        experiment.train_and_evaluate(dataclasses.replace(config, epochs=2, target_weights=("theta:4",)))


def test_a_checkpoint_that_appears_while_the_run_starts_is_not_resumed_unchecked(tmp_path, monkeypatch):
    # The saved setup is checked at start-up; a checkpoint written after that (by another run) is refused rather
    # than restored without the check.
    config = tiny_config(tmp_path, epochs=1)
    experiment.train_and_evaluate(config)
    monkeypatch.setattr(experiment, "_saved_config", lambda workdir: None)  # what start-up saw: a fresh workdir
    with pytest.raises(experiment.RunError, match="gained a checkpoint while this run started: run it again"):
        experiment.train_and_evaluate(dataclasses.replace(config, epochs=2))


def updates(tx, steps, *, grad=1.0, params=None, values=None):
    """The update of parameter w (3 zeros unless params) at each of `steps` calls with a constant gradient."""
    params = params or {"w": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad), params)
    tx = optax.with_extra_args_support(tx)
    state, seen = tx.init(params), []
    for step in range(steps):
        update, state = tx.update(grads, state, params, value=1.0 if values is None else values[step])
        seen.append(np.asarray(update["w"]))
    return seen


def test_cosine_schedule_decays_the_learning_rate_to_zero_at_the_last_step(tmp_path):
    # Adam's update for a constant gradient is the learning rate itself, so it shows the schedule.
    tx = experiment.build_optimizer(tiny_config(tmp_path, schedule="cosine", lr=0.01, epochs=2), steps_per_epoch=5)
    seen = [float(-u[0]) for u in updates(tx, 11)]
    assert seen[0] == pytest.approx(0.01, rel=1e-3)
    assert seen[5] == pytest.approx(0.005, rel=1e-3)  # halfway: cos(pi/2) halves it
    assert seen[10] == pytest.approx(0.0, abs=1e-9) and seen[9] < 0.0003
    constant = [float(-u[0]) for u in updates(experiment.build_optimizer(tiny_config(tmp_path, lr=0.01), 5), 11)]
    assert constant == pytest.approx([0.01] * 11, rel=1e-3)


def test_warmup_cosine_rises_from_zero_over_five_percent_of_the_steps_then_decays(tmp_path):
    config = tiny_config(tmp_path, schedule="warmup_cosine", lr=0.01, epochs=4)
    seen = [float(-u[0]) for u in updates(experiment.build_optimizer(config, steps_per_epoch=25), 101)]
    assert seen[0] == 0.0 and seen[2] == pytest.approx(0.004, rel=1e-3)  # 5 warm-up steps of 100
    assert seen[5] == pytest.approx(0.01, rel=1e-3) and max(seen) == pytest.approx(0.01, rel=1e-3)
    assert seen[5 + 95 // 2] == pytest.approx(0.005, rel=0.02)  # halfway through the decay
    assert seen[100] == pytest.approx(0.0, abs=1e-9)


def test_plateau_halves_the_learning_rate_after_patience_flat_epochs(tmp_path):
    tx = experiment.build_optimizer(tiny_config(tmp_path, schedule="plateau", lr=0.01), steps_per_epoch=2)
    seen = [float(-u[0]) for u in updates(tx, 20, values=[1.0] * 20)]  # a loss that never improves
    # Epoch 1 (steps 0-1) sets the best; the 5th flat epoch after it (steps 10-11) exhausts the patience, and the
    # scale halves from its last step on (the next halving would come 5 flat epochs later, past step 19).
    assert seen[:11] == pytest.approx([0.01] * 11, rel=1e-3)
    assert seen[11:] == pytest.approx([0.005] * 9, rel=1e-3)


def test_weight_decay_shrinks_a_weight_whose_gradient_is_zero(tmp_path):
    tx = experiment.build_optimizer(tiny_config(tmp_path, lr=0.1, weight_decay=0.5), steps_per_epoch=1)
    (update,) = updates(tx, 1, grad=0.0, params={"w": jnp.full(3, 2.0)})
    np.testing.assert_allclose(update, -0.1 * 0.5 * 2.0, rtol=1e-6)  # decoupled decay: -lr * wd * w
    (plain,) = updates(
        experiment.build_optimizer(tiny_config(tmp_path, lr=0.1), 1), 1, grad=0.0, params={"w": jnp.full(3, 2.0)}
    )
    np.testing.assert_array_equal(plain, 0.0)


def test_bf16_runs_the_products_in_bfloat16(tmp_path):
    def products(precision):
        config = tiny_config(tmp_path, precision=precision)
        dataset = experiment.load_data(config)
        state = training.TrainState.create(
            experiment.build_model(config, dataset), experiment.build_optimizer(config, 6)
        )
        batch = next(iter(pipeline.batches(dataset, "train", 16, train=True, encoding=dataset.target_encoding())))
        step = training.make_train_step(experiment.loss_function(config, dataset), donate=False)
        hlo = step.lower(state, training.shard_batch(batch, training.data_mesh())).as_text()
        return re.findall(r"stablehlo.dot_general.*?-> tensor<[^>]*x(\w+)>", hlo)

    assert products("bf16") and set(products("bf16")) == {"bf16"}
    assert products("f32") and set(products("f32")) == {"f32"}


def test_on_nan_skip_leaves_the_parameters_and_counts_the_step(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, on_nan="skip", epochs=1)
    real_batches = pipeline.batches

    def one_bad_batch(dataset, split, *args, **kwargs):
        for number, batch in enumerate(real_batches(dataset, split, *args, **kwargs)):
            if split == "train" and number == 2:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(experiment.pipeline, "batches", one_bad_batch)
    kept = []
    real_epoch = training.train_epoch

    def watch(state, batches, train_step, mesh, **kwargs):
        on_step = kwargs.pop("on_step")

        def record(state, totals):
            kept.append(jax.tree.map(np.array, state.params))
            return on_step(state, totals)

        return real_epoch(state, batches, train_step, mesh, on_step=record, **kwargs)

    monkeypatch.setattr(experiment.training, "train_epoch", watch)
    result = experiment.train_and_evaluate(config)
    assert result["interrupted"] is None and len(result["history"]) == 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[0]["skipped_steps"] == 1  # counted, and the run went on
    for before, after in zip(jax.tree.leaves(kept[1]), jax.tree.leaves(kept[2]), strict=True):
        np.testing.assert_array_equal(before, after)  # step 3 (the NaN batch) changed nothing
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept[2]), jax.tree.leaves(kept[3]), strict=True)
    )


def test_a_second_identical_run_compiles_from_the_persistent_cache(tmp_path, monkeypatch):
    # The tiny MLP compiles in well under the 0.5 s threshold; cache every program for the test.
    monkeypatch.setattr(experiment, "CACHE_MIN_COMPILE_SECONDS", 0)
    events = []
    jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
    cache = tmp_path / "cache"
    for name in ("first", "second"):
        events.clear()
        jax.clear_caches()  # as a new process would: nothing compiled in memory, no cache folder chosen yet
        compilation_cache.reset_cache()
        experiment.train_and_evaluate(tiny_config(tmp_path, workdir=str(tmp_path / name), compilation_cache=str(cache)))
        if name == "first":
            entries = sorted(p.name for p in cache.iterdir())
            assert entries and events.count("/jax/compilation_cache/cache_misses") >= 2  # train and eval steps
    assert (
        events.count("/jax/compilation_cache/cache_hits") >= 2 and "/jax/compilation_cache/cache_misses" not in events
    )
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new written


def test_tensorboard_events_and_the_loss_curve_are_written(tmp_path):
    pytest.importorskip("tensorboardX")  # in the test extra: the events are only written where it is installed
    experiment.train_and_evaluate(tiny_config(tmp_path))
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    content = events.read_bytes()
    assert b"loss/train" in content and b"loss/validation" in content
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def test_the_tensorboard_writer_leaves_torch_unloaded_and_importable(tmp_path):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("torch")
    # In a fresh interpreter: tensorboardX would import torch (seconds of every run's start) to recognise tensors.
    code = (
        "import sys; from jaxnets import monitor; writer = monitor._tensorboard(sys.argv[1]); "
        "writer.add_scalar('loss/train', 0.5, 1); writer.close(); loaded = 'torch' in sys.modules; "
        "import torch; print(loaded, torch.ones(2).sum().item())"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "2.0"]  # not loaded by the writer; importable afterwards
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"loss/train" in events.read_bytes()


@pytest.mark.parametrize("bad, stops_after", [(7, 20), (27, 30)])
def test_the_nan_check_names_the_step_that_went_bad(tmp_path, monkeypatch, bad, stops_after):
    # 30 steps per epoch, checked every 20 steps and at the epoch's end: a NaN at step 7 stops the run after step 20,
    # one at step 27 at the end of the epoch; both name the step that went bad.
    real_batches, fed = pipeline.batches, []

    def nan_at(dataset, split, *args, **kwargs):
        for number, batch in enumerate(real_batches(dataset, split, *args, **kwargs)):
            if split == "train" and kwargs.get("epoch", 0) >= 1:  # not the batch that traces the step
                fed.append(number)
                if number == bad - 1:
                    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(experiment.pipeline, "batches", nan_at)
    with pytest.raises(experiment.RunError, match=rf"NaN or Inf at step {bad} in epoch 1") as error:
        experiment.train_and_evaluate(tiny_config(tmp_path, num_train=16 * 30, epochs=1))
    assert error.value.exit_code == 3 and len(fed) == stops_after
