"""How high the roulette amplitudes' mean R² can go when the smallest lens configurations are not resolved.

A roulette amplitude of order m is a derivative of the lens potential at the image point, and near a lens centre it
grows like the lens's strength over the distance to that centre to the power m: the rare images whose image point lies a
few pixels from a lens centre hold most of each high-order amplitude's variance (docs/cosmosim_runs.md, "What decides
the amplitudes of orders 2–4"). This reads a CosmoSim simulation (the params.csv and roulette.csv that `python -m
CosmoSim` or `train.py --simulate` wrote), finds for each image the distance from the image point (xiX, xiY) to the
nearest lens centre, in pixels of the network's input (CosmoSim's pixels divided by crop size / image size), and for
each threshold reports the ceiling: the mean R² over the amplitudes of a predictor that is exact on every image whose
distance is at least the threshold and, on the images under it, knows only that they are under it (it predicts their
mean). A network that cannot resolve the configurations under the threshold cannot beat that ceiling.

    python bench/amplitude_ceiling.py data/cosmosim_simulated/sie_<hash> [--crop-size 256 --image-size 128]
"""

import argparse
import os
import sys

import numpy as np
import pandas as pd

from jaxnets.data.cosmosim import ROULETTE_AMPLITUDE, cluster_lenses

THRESHOLDS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def lens_centres(params: pd.DataFrame) -> np.ndarray:
    """Each image's lens centres in CosmoSim's lens frame, [N, lenses, 2]: one lens at the origin (a params.csv with
    an einsteinradius column), or the x/y of each lens of the `cluster` column ('SIE/x/y/radius/...;SIS/x/y/...')."""
    if "cluster" not in params:
        return np.zeros((len(params), 1, 2))
    lenses = [[fields[1:3] for fields in cluster_lenses(cell)] for cell in params["cluster"]]
    if len({len(row) for row in lenses}) != 1:
        raise ValueError("every image must have the same number of lenses")
    return np.asarray(lenses, dtype=np.float64)


def nearest_lens_distance(params: pd.DataFrame, roulette: pd.DataFrame) -> np.ndarray:
    """[N] distance in CosmoSim's pixels from each image point to the nearest lens centre. The roulette CSV gives the
    image point as xi and the offset of the image's frame as lens (lensX, lensY): xi - lens is in the lens frame."""
    point = (roulette[["xiX", "xiY"]].to_numpy(np.float64) - roulette[["lensX", "lensY"]].to_numpy(np.float64))[:, None]
    return np.linalg.norm(point - lens_centres(params), axis=-1).min(axis=1)


def ceiling(amplitudes: np.ndarray, unresolved: np.ndarray) -> np.ndarray:
    """Per target R² [K] of the predictor exact on the rows not in `unresolved` (bool [N]) and equal to the mean of
    the unresolved rows on those; amplitudes: [N, K]."""
    predicted = amplitudes.copy()
    if unresolved.any():
        predicted[unresolved] = amplitudes[unresolved].mean(axis=0)
    return 1 - ((amplitudes - predicted) ** 2).mean(axis=0) / amplitudes.var(axis=0)


def read_simulation(folder: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """params.csv and roulette.csv of one simulation, row-aligned by filename, and the names of the amplitudes that
    vary (the always-zero ones, such as beta[m][0], carry no R²)."""
    params = pd.read_csv(os.path.join(folder, "params.csv"))
    roulette = pd.read_csv(os.path.join(folder, "roulette.csv"))
    roulette = roulette.set_index("filename").loc[params["filename"]].reset_index()
    names = [c for c in roulette.columns if ROULETTE_AMPLITUDE.fullmatch(c) and roulette[c].std() > 0]
    if not names:
        raise ValueError(f"{folder}/roulette.csv has no varying roulette amplitudes")
    return params, roulette, names


def ceilings(folder: str, pixel_size: float, thresholds=THRESHOLDS) -> list[dict]:
    """For each threshold (in the network's pixels): the share of images under it and the amplitudes' mean R²
    ceiling."""
    params, roulette, names = read_simulation(folder)
    distance = nearest_lens_distance(params, roulette) / pixel_size
    amplitudes = roulette[names].to_numpy(np.float64)
    rows = []
    for threshold in thresholds:
        unresolved = distance < threshold
        rows.append(
            {"threshold": threshold, "images": int(unresolved.sum()), "share": float(unresolved.mean()),
             "ceiling": float(ceiling(amplitudes, unresolved).mean())}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a CosmoSim simulation: params.csv and roulette.csv")
    parser.add_argument("--crop-size", type=int, default=256, help="CosmoSim's crop size in its pixels (256)")
    parser.add_argument("--image-size", type=int, default=128, help="the network's input size in pixels (128)")
    args = parser.parse_args(argv)
    try:
        rows = ceilings(args.folder, args.crop_size / args.image_size)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.folder}: image point to the nearest lens centre, in pixels at {args.image_size} px")
    print(f"{'under (px)':>10} {'images':>8} {'share':>7} {'ceiling':>8}")
    for row in rows:
        print(f"{row['threshold']:>10g} {row['images']:>8} {row['share']:>7.1%} {row['ceiling']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
