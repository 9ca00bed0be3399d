"""Evaluate a saved run: the lecture's no-grad test loop in eval mode, from the workdir alone (the work behind
evaluate.py). It rebuilds data and model from the run's config.json, restores a checkpoint and writes the report.
"""

import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from jaxnets import data as data_lib
from jaxnets import metrics, report, training
from jaxnets.checkpoint import CHECKPOINT_DIR, Checkpointer, read_refit
from jaxnets.config import Config
from jaxnets.data import pipeline
from jaxnets.data.symmetry import SYMMETRIES, transform_images
from jaxnets.data.targets import TargetEncoding
from jaxnets.experiment import (
    RunError,
    build_model,
    build_optimizer,
    has_symmetry,
    load_data,
    loss_function,
    regression_outputs,
    setup_jax,
    target_symmetry,
)
from jaxnets.refit import with_head_layers


def _candidates(checkpointer: Checkpointer, which: str) -> list[int]:
    """The checkpoints to try, best first: by validation loss for "best" (mid-epoch saves last), newest first for
    "latest"."""
    newest_first = sorted(checkpointer.steps(), reverse=True)
    if which == "latest":
        return newest_first
    losses = {step: checkpointer.validation_loss(step) for step in newest_first}
    rated = [step for _, step in sorted((loss, step) for step, loss in losses.items() if loss is not None)]
    return rated + [step for step in newest_first if step not in rated]


def saved_encoding(record: dict, dataset: data_lib.Dataset) -> TargetEncoding:
    """The target encoding a checkpoint was trained with (runs before angles saved only a mean and std)."""
    if record.get("targets") is not None:
        return TargetEncoding.from_json(record["targets"])
    plain = dataset.target_encoding(standardize=False)
    if record.get("target_mean") is None:
        return plain
    mean, std = (np.asarray(record[key], np.float32) for key in ("target_mean", "target_std"))
    return dataclasses.replace(plain, mean=mean, std=std)


def _with_refitted_head(state: training.TrainState, workdir: str, step: int) -> tuple[training.TrainState, dict | None]:
    """state with the head train.py refitted for checkpoint step (`jaxnets.refit`), and that refit's record; (state,
    None) where there is none, or, with a warning, where it cannot be read or does not fit."""
    try:
        found = read_refit(workdir, step)
        if found is None:
            return state, None
        layers, record = found
        return with_head_layers(state, layers), record
    except ValueError as error:
        warnings.warn(f"{error}; evaluating the head as trained", stacklevel=2)
        return state, None


def _in_every_view(batches: Iterable[dict], views: list[np.ndarray], counts: list[int]) -> Iterator[dict]:
    """Each batch in every view in turn (one of the square's symmetries: the images moved, the targets as they
    are), so the split is read once; counts gets each batch's real (unmasked) rows."""
    for batch in batches:
        counts.append(int(np.count_nonzero(np.asarray(batch["mask"]) > 0)))
        for view in views:
            yield dict(batch, image=transform_images(batch["image"], view))


def per_view(rows: np.ndarray, counts: list[int], views: int) -> list[np.ndarray]:
    """Undoes `_in_every_view`'s order: rows [views * sum(counts), ...], batch by batch and in each batch view by
    view, -> one array [sum(counts), ...] per view."""
    if not counts:  # an empty split
        return [rows] * views
    ends = np.cumsum([count * views for count in counts])[:-1]
    split = zip(np.split(rows, ends), counts, strict=True)
    blocks = [block.reshape(views, count, *rows.shape[1:]) for block, count in split]
    return [np.concatenate([block[view] for block in blocks]) for view in range(views)]


def evaluate_run(
    workdir: str,
    *,
    step: int | None = None,
    which: str = "best",
    split: str = "test",
    data_dir: str | None = None,
    tta: bool | None = None,
    refit: bool = True,
) -> dict:
    """The no-grad test loop on a saved run: rebuilds model and data from the workdir's config,
    restores a checkpoint (step, or the best / latest), writes eval_<split>.json,
    predictions_<split>.csv and predictions_<split>.png, and returns the report.

    tta (test-time augmentation): predict each image in all 8 of the square's rotations and mirrors, move each
    prediction back and average them (default: when the targets have such a rule, CosmoSim data).

    refit: evaluate with the head train.py refitted for this checkpoint (--refit-head), when it saved one; False: the
    head as trained."""
    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist: train first (python train.py --workdir ...)")
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        raise RunError(f"no checkpoints folder in {workdir!r}: train first, or check --workdir")
    try:
        config = Config.load(workdir)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(str(error)) from None
    if data_dir:
        config = dataclasses.replace(config, data_dir=data_dir)
    setup_jax(config)
    checkpointer = Checkpointer(workdir, read_only=True)
    available = checkpointer.steps()
    if not available:
        raise RunError(f"no complete checkpoint in {checkpointer.directory}: train first, or check --workdir")
    if step is not None and step not in available:
        raise RunError(f"no checkpoint at step {step} in {checkpointer.directory}; available steps: {available}")
    if step is not None:
        which, candidates = "step", [step]
    else:
        if which == "best" and checkpointer.best_step() is None:
            which = "latest"  # no checkpoint records a validation loss
        candidates = _candidates(checkpointer, which)
    dataset = load_data(config)
    if split not in dataset.splits:
        raise RunError(f"dataset {dataset.name!r} has no split {split!r}; it has {sorted(dataset.splits)}")
    if tta is None:
        tta = has_symmetry(dataset)
    try:
        symmetry = target_symmetry(dataset) if tta else None
    except ValueError as error:
        raise RunError(f"--tta: {error}") from None
    loss_fn = loss_function(config, dataset)
    # The checkpoint holds every weight: the template needs only the shapes, not --init-from's file.
    template = training.TrainState.create(
        build_model(dataclasses.replace(config, init_from=None), dataset), build_optimizer(config, 1)
    )
    for step in candidates:
        try:
            state, record = checkpointer.restore(template, step)
            break
        except ValueError as error:
            if step == candidates[-1]:
                raise RunError(str(error)) from None
            # A damaged best (or latest) checkpoint: the next one in line, and the report says so.
            warnings.warn(f"{error}; evaluating the next {which} checkpoint instead", stacklevel=2)
    validation_loss = checkpointer.validation_loss(step)
    mesh = training.data_mesh()
    encoding = saved_encoding(record, dataset) if dataset.task == "regression" else None
    state, refitted = training.with_ema_params(state), None
    if refit:
        state, refitted = _with_refitted_head(state, workdir, step)
    state = training.replicate(state, mesh)
    eval_step = training.make_eval_step(loss_fn, with_predictions=True)
    views = SYMMETRIES if symmetry is not None else SYMMETRIES[:1]
    counts = []
    batches = pipeline.batches(
        dataset, split, config.batch_size, train=False, encoding=encoding, pixel_scale=config.pixel_scale
    )
    result = training.evaluate(state, _in_every_view(batches, views, counts), eval_step, mesh, with_predictions=True)
    view_predictions = per_view(result["predictions"], counts, len(views))
    for key in ("targets", "index"):  # the same in every view
        result[key] = per_view(result[key], counts, len(views))[0]
    predictions, true = view_predictions[0], result["targets"]
    if dataset.task == "regression":
        # true holds the raw targets: the batches carry them
        averaged, summary = regression_outputs(dataset, encoding, symmetry, views, view_predictions, true)
        if symmetry is not None:
            result["loss"] = float(loss_fn(averaged, encoding.encode(true)))
        predictions = encoding.decode(averaged)
    else:
        summary = metrics.classification_report(true, predictions, dataset.target_names)
    summary.update(
        loss=result["loss"],
        views=len(views),
        split=split,
        step=int(step),
        checkpoint=which,
        validation_loss=validation_loss,
        refitted_head=refitted,
        workdir=workdir,
    )
    if jax.process_index() == 0:
        report.write_json(os.path.join(workdir, f"eval_{split}.json"), summary)
        if dataset.task == "regression":
            report.write_predictions(
                os.path.join(workdir, f"predictions_{split}.csv"),
                result["index"],
                true,
                predictions,
                list(dataset.target_names),
                dataset.splits[split].identifiers(),
            )
            report.plot_predictions(os.path.join(workdir, f"predictions_{split}.png"), true, predictions, summary)
        else:
            report.write_predictions(
                os.path.join(workdir, f"predictions_{split}.csv"),
                result["index"],
                true,
                predictions.argmax(axis=-1),
                ["label"],
                dataset.splits[split].identifiers(),
            )
    return summary
