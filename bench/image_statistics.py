"""How much of each target a few image statistics explain: a network-free baseline for a trained run.

Loads a run's data exactly as train.py and evaluate.py do (from its config.json: the same converted, resized
images and the same train / validation / test split), computes six statistics per image: log total flux, log
count of saturated pixels (>= 254), log count of lit pixels (> 8), the brightest pixel, log flux per lit pixel
and the square root of the count of pixels >= 128. A least-squares fit that is quadratic in them (with every
pairwise product) on the train split predicts the other splits; targets are fitted as the run encodes them
(angles as cos/sin), and R² is computed as evaluate.py does (circular for angles). Run it from the folder
train.py ran in (a run's data paths are relative to it):

    python bench/image_statistics.py runs/sim-cluster4-inception3 [--splits validation,test]
"""

import argparse
import dataclasses
import sys

import numpy as np

from jaxnets import experiment, metrics
from jaxnets.config import Config

AMPLITUDE_PREFIXES = ("alpha[", "beta[")


def statistics(image: np.ndarray) -> np.ndarray:
    """The six statistics of one uint8 image [H, W, 1], float64 [6]."""
    values = image[..., 0].astype(np.float64)
    flux, lit = np.log1p(values.sum()), np.log1p((values > 8).sum())
    return np.array(
        [flux, np.log1p((values >= 254).sum()), lit, values.max() / 255, flux - lit, np.sqrt((values >= 128).sum())]
    )


def quadratic_features(stats: np.ndarray) -> np.ndarray:
    """[N, K] -> [N, 1 + K + K (K + 1) / 2]: a constant, the statistics and every product of two (squares too)."""
    first, second = np.triu_indices(stats.shape[1])
    return np.hstack([np.ones((len(stats), 1)), stats, stats[:, first] * stats[:, second]])


def fit(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least-squares weights [F, W] of targets [N, W] on features [N, F]."""
    weights, *_ = np.linalg.lstsq(features, targets, rcond=None)
    return weights


def split_statistics(examples, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A split's quadratic features [N, F] and raw targets float32 [N, P], in split order."""
    stats, targets = [], []
    for start in range(0, len(examples), chunk):
        for example in examples.__getitems__(range(start, min(start + chunk, len(examples)))):
            stats.append(statistics(example["image"]))
            targets.append(example["target"])
    return quadratic_features(np.stack(stats)), np.stack(targets)


def baseline(config: Config, splits: tuple[str, ...] = ("validation", "test")) -> dict[str, dict]:
    """Fits the statistics to the train split of config's data; returns {split: regression report} (as
    `jaxnets.metrics.regression_report`) for each of splits."""
    dataset = experiment.load_data(config)
    if dataset.task != "regression":
        raise ValueError(f"the image-statistics baseline is for regression; {dataset.name} is {dataset.task}")
    missing = [split for split in ("train", *splits) if split not in dataset.splits]
    if missing:
        raise ValueError(f"dataset {dataset.name!r} has no split {missing[0]!r}; it has {sorted(dataset.splits)}")
    encoding = dataset.target_encoding(standardize=False, axis_ratios=experiment.angle_axes(config, dataset))
    features, targets = split_statistics(dataset.splits["train"])
    weights = fit(features, encoding.encode(targets))
    reports = {}
    for split in splits:
        features, targets = split_statistics(dataset.splits[split])
        predicted = encoding.decode(features @ weights)
        reports[split] = metrics.regression_report(targets, predicted, dataset.target_names, periods=encoding.periods)
    return reports


def format_table(reports: dict[str, dict]) -> str:
    """Per target R² by split, then the uniform mean and the means over parameters and over amplitudes."""
    splits = list(reports)
    r2 = {split: {name: p["r2"] for name, p in report["parameters"].items()} for split, report in reports.items()}
    names = list(r2[splits[0]])
    width = max([12] + [len(name) + 2 for name in names])
    lines = [f"{'R²':<{width}}" + "".join(f"{split:>12}" for split in splits)]
    lines += [f"{name:<{width}}" + "".join(f"{r2[split][name]:>12.3f}" for split in splits) for name in names]
    amplitudes = [name for name in names if name.startswith(AMPLITUDE_PREFIXES)]
    groups = {"uniform mean": names}
    if 0 < len(amplitudes) < len(names):
        groups.update(parameters=[name for name in names if name not in amplitudes], amplitudes=amplitudes)
    for label, members in groups.items():
        means = [np.mean([r2[split][name] for name in members]) for split in splits]
        lines.append(f"{label:<{width}}" + "".join(f"{mean:>12.3f}" for mean in means))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="a run folder train.py wrote (its config.json names the data)")
    parser.add_argument("--splits", default="validation,test", help="the splits to predict (fit on train)")
    parser.add_argument("--data-dir", help="TFDS data folder, if not the one the run was trained with")
    args = parser.parse_args(argv)
    try:
        config = Config.load(args.workdir)
        if args.data_dir:
            config = dataclasses.replace(config, data_dir=args.data_dir)
        reports = baseline(config, tuple(args.splits.split(",")))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {report['count']}" for split, report in reports.items())
    print(f"{config.dataset_name} at {config.image_size or 'stored'} px, fit on the train split; predicted: {counts}")
    print(format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
