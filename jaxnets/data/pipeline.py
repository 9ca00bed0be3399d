"""The input pipeline: one grain pipeline turns any dataset split into fixed-shape numpy batches.

Training batches are shuffled anew each epoch and drop the remainder; evaluation batches pad and mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from jaxnets.config import Config
from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry, transform_images
from jaxnets.data.targets import TargetEncoding

# Batches prepared ahead in background threads. Decoding (zlib, numpy) releases the GIL, so two threads
# overlap reading with the train step; a small buffer bounds memory (a 32 x 128^2 batch is 2 MiB).
READ_THREADS = Config().read_threads  # the run's default (--read-threads)
PREFETCH_BATCHES = 4
# How 8-bit pixel values become the network's input (--pixel-scale), as a table indexed by the value: "linear" v / 255,
# "log" log(1 + v) / log(256), 0 to 1 either way. In CosmoSim's images 82-95 % of the lit pixels are under 16 of 255,
# the lensed arcs among them: the log scale maps 1-15 to 0.125-0.5 instead of 0.004-0.059 (docs/cosmosim_runs.md,
# "Faint light on a log scale").
PIXEL_SCALES = {
    "linear": np.arange(256, dtype=np.float32) * np.float32(1 / 255),
    "log": (np.log1p(np.arange(256, dtype=np.float64)) / np.log(256.0)).astype(np.float32),
}


def _split(dataset, split: str):
    if split not in dataset.splits:
        raise ValueError(f"{dataset.name} has no {split!r} split; it has {', '.join(dataset.splits) or 'none'}")
    source = dataset.splits[split]
    if len(source) == 0:
        raise ValueError(f"the {split!r} split of {dataset.name} has no examples")
    return source


def _process_layout(batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(this process, process count, rows per process) for a global batch of `batch_size`."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {count} JAX processes")
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for {count} processes")
    return index, count, batch_size // count


def num_batches(dataset, split: str, batch_size: int, *, train: bool) -> int:
    """Batches per epoch: floor(N / B) in training (remainder dropped), ceil(N / B) in evaluation (padded)."""
    count = len(_split(dataset, split))
    _process_layout(batch_size, None, None)
    if train:
        if batch_size > count:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {count} examples of "
                f"{dataset.name} {split!r}: training would see no batch"
            )
        return count // batch_size
    return math.ceil(count / batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit shuffle seed for (seed, epoch): independent streams, so seed 0 epoch 1 != seed 1 epoch 0."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class _Padded:
    """A split followed by empty examples (index -1, mask 0) up to `length`: full evaluation batches."""

    def __init__(self, source, length: int):
        self.source = source
        self.length = length
        first = source[0]
        self.padding = {
            key: (np.int32(-1) if key == "index" else np.float32(0.0) if key == "mask" else np.zeros_like(value))
            for key, value in first.items()
        }

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[index] if index < len(self.source) else self.padding


def _random_views(symmetry: TargetSymmetry, seed: int, epoch: int, count: int):
    """Per batch: each example moved by one of the square's 8 symmetries, images and targets alike. The choice is
    drawn per example of the split from (seed, epoch), so it does not depend on the batching or a resume."""
    choices = np.random.default_rng([int(seed), int(epoch), len(SYMMETRIES)]).integers(len(SYMMETRIES), size=count)

    def augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen = choices[batch["index"]]
        image, target = batch["image"].copy(), batch["target"].astype(np.float64)
        for k in np.unique(chosen):
            rows = chosen == k
            image[rows] = transform_images(batch["image"][rows], SYMMETRIES[k])
            target[rows] = symmetry.apply(target[rows], SYMMETRIES[k])
        return dict(batch, image=image, target=target.astype(np.float32))

    return augment


def _finish(encoding: TargetEncoding | None, keep_raw: bool, pixel_scale: str):
    """Per batch: uint8 images to float32 in [0, 1] (PIXEL_SCALES), encoded targets (and the raw ones, with keep_raw),
    int32 labels."""
    scale = PIXEL_SCALES[pixel_scale]

    def finish(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {
            "image": scale[batch["image"]],
            "mask": batch["mask"].astype(np.float32),
            "index": batch["index"].astype(np.int32),
        }
        if "target" in batch:
            target = batch["target"].astype(np.float32)
            if keep_raw:
                out["raw_target"] = target  # the values themselves, for reports (exact, not decoded back)
            if encoding is not None:
                target = encoding.encode(target)
                target *= batch["mask"][:, None]  # padding rows stay exactly 0
            out["target"] = target
        if "label" in batch:
            out["label"] = batch["label"].astype(np.int32)
        return out

    return finish


def batches(
    dataset,
    split: str,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    standardize: tuple[np.ndarray, np.ndarray] | None = None,
    encoding: TargetEncoding | None = None,
    augment: TargetSymmetry | None = None,
    read_threads: int = READ_THREADS,
    process_index: int | None = None,
    process_count: int | None = None,
    pixel_scale: str = "linear",
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch of `split` as numpy arrays.

    Yields {"image": float32 [b, H, W, C] in [0, 1] (the uint8 values on the pixel_scale of PIXEL_SCALES; train.py
    passes experiment.default_pixel_scale(dataset) unless told: log for CosmoSim's images), "target":
    float32 [b, P] (regression; standardised with standardize=(mean, std)) or "label": int32 [b] (classification),
    "mask": float32 [b], "index": int32 [b] (example index in the split, -1 on padding)},
    b = batch_size / process count.
    train=True: shuffled by (seed, epoch), remainder dropped, every row real.
    train=False: in order, the last batch padded with mask 0, so each example appears exactly once.
    start_batch skips that many batches of the epoch without reading them (exact mid-epoch resume).
    augment: training only: each example rotated or mirrored at random, its targets moved with it by this rule.
    read_threads: threads reading and preparing examples ahead of the train step (more for a slow source).
    Under multi-process JAX each process gets rows [p*b, (p+1)*b) of every global batch.
    """
    source = _split(dataset, split)
    index, count, local = _process_layout(batch_size, process_index, process_count)
    total = num_batches(dataset, split, batch_size, train=train)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}] for {split!r}, got {start_batch}")
    if (standardize is not None or encoding is not None) and dataset.task != "regression":
        raise ValueError("standardize and encoding apply to regression targets only")
    if augment is not None and not train:
        raise ValueError("augment applies to training batches (train=True)")
    if standardize is not None and encoding is not None:
        raise ValueError("give standardize=(mean, std) or a TargetEncoding (which standardises), not both")
    if pixel_scale not in PIXEL_SCALES:
        raise ValueError(f"pixel_scale must be one of {', '.join(PIXEL_SCALES)}; got {pixel_scale!r}")
    # A TargetEncoding's batches also carry the raw targets; plain standardisation leaves undoing it to the caller.
    keep_raw = encoding is not None
    if standardize is not None:
        encoding = TargetEncoding.standardizing(*standardize)

    if train:
        examples = grain.MapDataset.source(source).shuffle(seed=epoch_seed(seed, epoch))
        examples = examples[: total * batch_size]
    else:
        examples = grain.MapDataset.source(_Padded(source, total * batch_size))
    # Global batch k is rows [k*B, (k+1)*B): the process-sized groups k*count .. k*count+count-1.
    # Slicing the grouped dataset is lazy, so skipped batches and other processes' rows are never read.
    groups = examples.batch(local, drop_remainder=True)
    mine = groups[index::count][start_batch:]
    if augment is not None:
        mine = mine.map(_random_views(augment, seed, epoch, len(source)))
    ready = mine.map(_finish(encoding, keep_raw, pixel_scale))
    if read_threads < 1:
        raise ValueError(f"read_threads must be at least 1, got {read_threads}")
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=PREFETCH_BATCHES)
    return iter(ready.to_iter_dataset(options))


def destandardize(target: np.ndarray, standardize: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Undoes standardisation for reports: target * std + mean, float32 [..., P]."""
    mean, std = (np.asarray(a, np.float32) for a in standardize)
    return np.asarray(target, np.float32) * std + mean


__all__ = ["batches", "num_batches", "destandardize", "epoch_seed"]
