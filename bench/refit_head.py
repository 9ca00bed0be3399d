"""The last layer of a trained run's head refitted by least squares on its frozen features: does the network know more
than its Huber-trained last layer says?

R² scores squared errors, and the roulette amplitudes' rare large values decide it; the Huber loss these targets train
with (docs/cosmosim_runs.md, "With the Huber loss") bounds what each of those rows pulls, and so shrinks what the last
layer predicts for them. This script keeps every weight of a run but the last Linear of its head, computes the features
that layer reads (the head's last hidden layer, eval mode) for the training split, in each of the square's 8 rotations
and mirrors with the targets moved alike (`--train-views 1`: as the images are), solves ridge least squares from them to
the encoded targets for several ridges, picks the one with the best validation R² over every target, reports validation
and test as `evaluate.py` does by default for CosmoSim data (8 views averaged), beside the run as trained. With
`--problem` the means are bench/cosmosim_problems.py's (uniform, identifiable, amplitudes).

`train.py --refit-head` (the default for CosmoSim data) does this at the end of a run with the training images as they
are, fine-tunes the whole head beside it, and keeps what scores best (`jaxnets.refit`); this script shows every ridge
of the last layer alone, the test split, and 8 training views.

    python bench/refit_head.py RUN_DIR --problem sie      # RUN_DIR: a workdir of bench/cosmosim_problems.py
"""

import argparse
import dataclasses
import functools
import json
import time

import numpy as np

from jaxnets import training
from jaxnets.checkpoint import Checkpointer
from jaxnets.config import Config
from jaxnets.data import Dataset, pipeline
from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry, transform_images
from jaxnets.data.targets import TargetEncoding
from jaxnets.evaluation import saved_encoding
from jaxnets.experiment import (
    build_model,
    build_optimizer,
    load_data,
    regression_outputs,
    setup_jax,
    target_symmetry,
)
from jaxnets.refit import RIDGES, NormalEquations, last_layer, make_feature_step


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's best checkpoint as evaluate.py reads it: its config and data, the state with its evaluated (EMA)
    parameters, the target encoding it was trained with and the rule that moves its targets."""

    config: Config
    dataset: Dataset
    step: int
    state: training.TrainState
    encoding: TargetEncoding
    symmetry: TargetSymmetry


def load_trained_run(workdir: str) -> TrainedRun:
    config = Config.load(workdir)
    setup_jax(config)
    dataset = load_data(config)
    checkpointer = Checkpointer(workdir, read_only=True)
    template = training.TrainState.create(
        build_model(dataclasses.replace(config, init_from=None), dataset), build_optimizer(config, 1)
    )
    step = checkpointer.best_step()
    state, record = checkpointer.restore(template, step)
    encoding = saved_encoding(record, dataset)  # as evaluate.py reads it, runs saved before angles too
    return TrainedRun(config, dataset, step, training.with_ema_params(state), encoding, target_symmetry(dataset))


def read_views(run: TrainedRun, forward, split: str, views) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """forward(images) -> features for the split's images in each view, its raw targets and its encoded targets."""
    per_view, true, encoded = [[] for _ in views], [], []
    for batch in pipeline.batches(
        run.dataset,
        split,
        run.config.batch_size,
        train=False,
        encoding=run.encoding,
        pixel_scale=run.config.pixel_scale,
    ):
        real = np.asarray(batch["mask"]) > 0
        true.append(np.asarray(batch["raw_target"])[real])
        encoded.append(np.asarray(batch["target"])[real])
        for rows, view in zip(per_view, views, strict=True):
            rows.append(np.asarray(forward(transform_images(batch["image"], view)))[real])
    return [np.concatenate(rows) for rows in per_view], np.concatenate(true), np.concatenate(encoded)


def averaged_report(run: TrainedRun, outputs: list[np.ndarray], true: np.ndarray) -> dict:
    """Per target errors and R² of the encoded outputs of the 8 views averaged, as evaluate.py reports them."""
    _, report = regression_outputs(run.dataset, run.encoding, run.symmetry, SYMMETRIES, outputs, true)
    return report["parameters"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--problem", help="the bench/cosmosim_problems.py problem, for its means")
    parser.add_argument("--train-views", type=int, default=8, choices=(1, 8))
    parser.add_argument("--out", help="write the report here as JSON")
    args = parser.parse_args()

    run = load_trained_run(args.workdir)
    encoding, symmetry = run.encoding, run.symmetry
    last = last_layer(run.state.model())
    trained = np.asarray(last.kernel[...], np.float64), np.asarray(last.bias[...], np.float64)
    feature_step = make_feature_step()

    def read(split: str, views) -> tuple[list[np.ndarray], np.ndarray]:
        """The split's features in each view, and its raw targets."""
        return read_views(run, lambda images: feature_step(run.state, {"image": images}), split, views)[:2]

    started = time.perf_counter()
    train_views = SYMMETRIES[: args.train_views]
    train_features, train_true = read("train", train_views)
    splits = {split: read(split, SYMMETRIES) for split in ("validation", "test")}
    print(f"features of every split in {time.perf_counter() - started:.0f} s", flush=True)
    encoded = encoding.encode(train_true)
    x = np.concatenate(train_features)
    y = np.concatenate([encoding.move(encoded, functools.partial(symmetry.apply, matrix=v)) for v in train_views])

    problem = None
    if args.problem:
        from cosmosim_problems import PROBLEMS, summarize  # bench/ is on sys.path when run as a script

        problem = PROBLEMS[args.problem]

    def means(parameters: dict) -> dict:
        if problem is None:
            return {"mean R²": float(np.nanmean([p["r2"] for p in parameters.values()]))}
        return summarize({"parameters": parameters}, problem)

    def scored(split: str, kernel: np.ndarray, bias: np.ndarray) -> dict:
        views, true = splits[split]
        parameters = averaged_report(run, [f @ kernel + bias for f in views], true)
        return {"means": means(parameters), "r2": {n: p["r2"] for n, p in parameters.items()}}

    results = {"as trained": {split: scored(split, *trained) for split in splits}}
    for ridge, fitted in zip(RIDGES, NormalEquations.of(x, y).solve(RIDGES), strict=True):
        results[f"ridge {ridge:g}"] = {split: scored(split, *fitted) for split in splits}
    key = lambda name: np.nansum(list(results[name]["validation"]["r2"].values()))  # noqa: E731
    best = max((name for name in results if name != "as trained"), key=key)
    for name, result in results.items():
        shown = {split: {k: round(v, 3) for k, v in result[split]["means"].items()} for split in splits}
        print(f"{name:12s} {'(chosen on validation) ' if name == best else ''}{shown}", flush=True)
    for split in splits:
        before, after = results["as trained"][split]["r2"], results[best][split]["r2"]
        print(split, "R², as trained -> refit:", {n: f"{before[n]:.3f} -> {after[n]:.3f}" for n in before})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "step": int(run.step), "chosen": best, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
