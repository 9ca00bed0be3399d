"""Data benchmark: lens generation (ray tracing alone, and the full TFDS build) and grain pipeline images/s.

Prints a table and one JSON line; medians over `--rounds`. The issue's targets: lens generation >= 2,000
images/s at 128^2, and a pipeline >= 10x what the Inception3 train step consumes (16.6 images/s at
batch 32, 1x128^2 on the 2-core CPU, shared/NOTES.md).

    python bench/data_throughput.py                     # 128^2, 8000/1000/1000 images, batch 32
    python bench/data_throughput.py --image-size 64 --rounds 5
"""

import argparse
import json
import platform
import statistics
import tempfile
import time

from jaxnets.data import lens, load_dataset
from jaxnets.data.pipeline import batches, num_batches

INCEPTION3_TRAIN_IMAGES_PER_S = 16.6  # jaxnets Inception3 train step, batch 32, 1x128^2, 2 CPU cores


def render_rate(image_size: int, count: int) -> float:
    """Images/s of sampling + ray tracing alone."""
    start = time.perf_counter()
    lens.generate(count, image_size, seed=0)
    return count / (time.perf_counter() - start)


def build_rate(image_size: int, sizes: tuple[int, int, int], seed: int) -> float:
    """Images/s of a complete TFDS build (render, zlib, ArrayRecord) into a fresh folder."""
    with tempfile.TemporaryDirectory() as data_dir:
        start = time.perf_counter()
        lens.build(image_size, *sizes, seed=seed, data_dir=data_dir)
        return sum(sizes) / (time.perf_counter() - start)


def pipeline_rate(dataset, batch_size: int, train: bool, epoch: int) -> float:
    """Images/s of one epoch of the train split through `batches` (standardised targets)."""
    stats = dataset.target_stats()
    start = time.perf_counter()
    count = 0
    for batch in batches(dataset, "train", batch_size, train=train, epoch=epoch, standardize=stats):
        count += len(batch["mask"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-validation", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = (args.num_train, args.num_validation, args.num_test)

    results = {"render": [], "build": [], "pipeline_train": [], "pipeline_eval": []}
    with tempfile.TemporaryDirectory() as data_dir:
        dataset = load_dataset(
            "lens",
            image_size=args.image_size,
            num_train=args.num_train,
            num_validation=args.num_validation,
            num_test=args.num_test,
            data_dir=data_dir,
        )
        num_batches(dataset, "train", args.batch_size, train=True)  # validates the batch size early
        # Alternate the measurements round by round: the machine is shared and its speed drifts.
        for round_number in range(args.rounds):
            results["render"].append(render_rate(args.image_size, 4000))
            results["build"].append(build_rate(args.image_size, sizes, seed=round_number + 1))
            results["pipeline_train"].append(pipeline_rate(dataset, args.batch_size, True, round_number))
            results["pipeline_eval"].append(pipeline_rate(dataset, args.batch_size, False, round_number))

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"\n{args.image_size}x{args.image_size}, splits {sizes}, batch {args.batch_size}, "
        f"{args.rounds} rounds, {platform.processor() or platform.machine()}"
    )
    labels = {
        "render": "lens ray tracing (sample + render)",
        "build": "lens TFDS build (render+zlib+write)",
        "pipeline_train": "pipeline, train (shuffle, standardise)",
        "pipeline_eval": "pipeline, eval (pad, mask)",
    }
    for name, value in medians.items():
        spread = f"{min(results[name]):8.0f} - {max(results[name]):.0f}"
        print(f"  {labels[name]:42s} {value:8.0f} images/s   (range {spread})")
    ratio = medians["pipeline_train"] / INCEPTION3_TRAIN_IMAGES_PER_S
    print(f"  pipeline / Inception3 train step ({INCEPTION3_TRAIN_IMAGES_PER_S} images/s): {ratio:.0f}x")
    print(
        json.dumps(
            {
                "benchmark": "data_throughput",
                "image_size": args.image_size,
                "splits": sizes,
                "batch_size": args.batch_size,
                "images_per_s": {k: round(v) for k, v in medians.items()},
                "pipeline_over_inception3_train": round(ratio, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
