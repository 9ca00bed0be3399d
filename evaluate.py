"""Evaluate a trained run: the lecture's no-grad test loop, in eval mode, over every example of a split.

Prints a per-parameter table (MAE, mean error, RMSE, R²) or accuracy and a confusion matrix, and writes
eval_<split>.json, predictions_<split>.csv and predictions_<split>.png into the run folder.
"""

import argparse
import sys

from jaxnets import host_memory
from jaxnets.config import Config


def evaluate(args: argparse.Namespace) -> int:
    from jaxnets import evaluation, report

    summary = evaluation.evaluate_run(
        args.workdir,
        step=args.step,
        which=args.which or "best",
        split=args.split,
        data_dir=args.data_dir,
        tta=args.tta,
        refit=args.refit,
    )
    views = f", averaged over {summary['views']} rotations and mirrors" if summary["views"] > 1 else ""
    print(f"{args.workdir}, {report.describe_checkpoint(summary)}, split {args.split}{views}:")
    print(report.format_report(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default=Config().run_dir, help="the run folder train.py wrote")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="evaluate the checkpoint of this training step")
    which.add_argument(
        "--best",
        dest="which",
        action="store_const",
        const="best",
        help="the checkpoint with the lowest validation loss (default)",
    )
    which.add_argument(
        "--latest", dest="which", action="store_const", const="latest", help="the most recent checkpoint"
    )
    parser.add_argument("--split", default="test", help="which split to evaluate (test, validation, train)")
    parser.add_argument("--data-dir", help="TFDS data folder, if not the one the run was trained with")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time augmentation: predict each image in all 8 of the square's rotations and mirrors, move the "
        "predictions back (xiX/xiY, angles and roulette amplitudes turn with the image) and average them "
        "(default: on for CosmoSim targets that all have such a rule and square images)",
    )
    parser.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the head train.py refitted for the checkpoint (--refit-head: its last layer by least squares, or "
        "the whole head fine-tuned), when it saved one; --no-refit evaluates the head as trained",
    )
    args = parser.parse_args(argv)
    from jaxnets import experiment  # after argument parsing, so --help is instant

    return experiment.run_command(evaluate, args)


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # before JAX allocates: faster steps on CPU
    sys.exit(main())
