"""How much of a CosmoSim parameter a few image statistics explain: a baseline for what a network should reach.

Reads a CosmoSim simulation folder (`params.csv`, `roulette.csv` and the images, as `python -m CosmoSim` or
`train.py --simulate` writes them; the latter caches them under <data dir>/cosmosim_simulated/<toml>_<hash>/),
resizes every image as jaxnets does (Lanczos, `jaxnets.data.cosmosim.load_image`), and computes six statistics
per image: log total flux, log count of saturated pixels (>= 254), log count of lit pixels (> 8), the brightest
pixel, log flux per lit pixel and the square root of the count of pixels >= 128. A least-squares fit that is
quadratic in them (with every pairwise product) on the first --num-train rows predicts the rest; the script
prints each target's R² on those.

    python bench/image_statistics.py <data dir>/cosmosim_simulated/cluster4_<hash> --targets sigma,luminosity
"""

import argparse
import csv
import os

import numpy as np

from jaxnets.data.cosmosim import load_image


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


def r2_of_fit(features: np.ndarray, target: np.ndarray, num_train: int) -> float:
    """R² on rows num_train: of the least-squares fit on the rows before."""
    weights, *_ = np.linalg.lstsq(features[:num_train], target[:num_train], rcond=None)
    residual = features[num_train:] @ weights - target[num_train:]
    return float(1 - np.mean(residual**2) / np.var(target[num_train:]))


def read_columns(folder: str) -> dict[str, list[str]]:
    """params.csv's and roulette.csv's columns by name (roulette.csv's where both have one), in the rows' order."""
    columns: dict[str, list[str]] = {}
    for name in ("params.csv", "roulette.csv"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        table = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        if "filename" in columns and table.get("filename", columns["filename"]) != columns["filename"]:
            raise SystemExit(f"params.csv and roulette.csv in {folder} list different images")
        columns.update(table)
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a CosmoSim simulation folder: params.csv, roulette.csv, images")
    parser.add_argument("--targets", default="sigma,luminosity,n_sersic,xiX,xiY")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=3000)
    args = parser.parse_args()

    columns = read_columns(args.folder)
    if "filename" not in columns:
        raise SystemExit(f"no params.csv or roulette.csv with a filename column in {args.folder}")
    paths = [os.path.join(args.folder, name) for name in columns["filename"]]
    if not 0 < args.num_train < len(paths):
        raise SystemExit(f"--num-train must leave rows to test: the folder has {len(paths)}")
    features = quadratic_features(np.stack([statistics(load_image(p, args.image_size)) for p in paths]))
    print(
        f"{len(paths)} images at {args.image_size} px; fit on {args.num_train}, "
        f"R² on the other {len(paths) - args.num_train}"
    )
    for target in args.targets.split(","):
        if target not in columns:
            raise SystemExit(f"no column {target!r} in {args.folder}'s CSV files")
        values = np.array([float(v) for v in columns[target]])
        print(f"{target:12s} R² {r2_of_fit(features, values, args.num_train):.3f}")


if __name__ == "__main__":
    main()
