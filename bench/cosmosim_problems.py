"""The CosmoAI group's 2026 problems, simulated with CosmoSim and trained with jaxnets' default recipe.

The group publishes its experiments in CosmoAI-AES/experiment2026july: SIE/, cluster2SIE/ and cluster4SIS/,
each a CosmoSim distribution (copied into bench/problems/<name>.toml), a problem (targets: five parameters plus
the nterms-4 roulette amplitudes; 10,000 / 1,000 / 4,000 images) and their result: an ImageNet-pretrained
regnet_y_32gf (Adam 1e-3, batch 32, weight decay 1e-4, 256 px) reaching the best validation R² below (the uniform
mean over all targets, `valid_r2` in their training_log.csv).

For each problem this runs `python train.py --simulate bench/problems/<name>.toml` (CosmoSim draws the images
at 512 px, crops 256 and centres; --image-size resizes them) with the problem's targets (and train.py's default for
CosmoSim data, the head refitted after the last epoch), then `evaluate.py` on the validation
and test splits (each image's predictions averaged over its 8 rotations and mirrors, as evaluate.py does by default
for these targets; first with the head as trained, --no-refit, then with the refit), and prints per target R²
(circular for angles) and MAE, the uniform mean as they compute it, the mean over the identifiable parameters and the
mean over the amplitudes, beside their figure. What the simulation records besides sie's targets (the SIE lens's
Einstein radius, ellipse ratio and orientation, the source's polar position) is trained alongside as auxiliary
targets, with sigma weighed 2, and reported apart, out of every mean: it lifts every mean of sie by 0.016–0.044 on
two seeds (docs/cosmosim_runs.md, "Auxiliary targets"); --no-auxiliary trains the problem's targets alone. A
Sersic-sphere source has no sigma2 or theta to see: those are reported, flagged, and kept out of the means over
identifiable parameters (they stay in the uniform mean, as in theirs).

    python bench/cosmosim_problems.py --problems sie,cluster4,cluster2                                # CPU
    python bench/cosmosim_problems.py --image-size 256 --num-train 10000 --num-validation 1000 \\
        --num-test 4000 --epochs 30                                                                  # GPU

On a GPU lent for minutes, `--time-budget SECONDS` fits each problem into that time: a calibration run of one epoch
first (simulation, conversion and compile included), then as many epochs as fit what is left, less RESERVE_SECONDS
for the run's start and the four evaluations (at most --epochs, else 40).

On CPU each problem trains at 128 px on 3,000 images for 10 epochs, sie on 6,000 for 5 with --augment (each
image turned or mirrored at random): the setting that measured best within 20 minutes (README, "Where it
stands"). The pixels reach the network on a log scale, train.py's default for CosmoSim images (docs/cosmosim_runs.md,
"Faint light on a log scale"). Extra train.py options go after `--`: `... -- --precision bf16`, `-- --no-augment`,
`-- --pixel-scale linear`.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMPLITUDES = "alpha[*][*],beta[*][*]"
# --time-budget: what the run after the calibration needs besides its epochs (its start and compile from the cache,
# the four evaluations: 180 s measured in docs/cosmosim_runs.md, "sie at their setting on one GPU"; the refit of the
# head, a pass over the training images and 8 over the validation's without gradients and 30 epochs of the head alone
# on what it read), with a margin.
RESERVE_SECONDS = 240
MOST_EPOCHS = 40  # --time-budget without --epochs


@dataclasses.dataclass(frozen=True)
class Problem:
    toml: str  # under bench/problems
    parameters: tuple[str, ...]  # the problem's `variables`; the amplitudes are added
    not_identifiable: dict[str, str]  # parameter -> why the image cannot show it
    their_best: float  # best validation R² (uniform mean) in their training_log.csv
    their_epoch: int  # the epoch it was reached
    their_epochs: int  # the epochs they ran
    # What the simulation records besides the targets, trained alongside them (--auxiliary, the default) and kept
    # out of every mean: the amplitudes are functions of the lens and the source position (docs/cosmosim_runs.md,
    # "Auxiliary targets"); with them, the --target-weights that keep a fragile target learned.
    auxiliary: tuple[str, ...] = ()
    auxiliary_weights: tuple[str, ...] = ()
    # The CPU setting, where --num-train and --epochs are not given: what fits 20 minutes of training on the
    # 2-vCPU CPU and measured best for the problem (README, "Where it stands"), with train.py options of its own.
    num_train: int = 3000
    epochs: int = 10
    options: tuple[str, ...] = ()


SPHERE = "a Sersic-sphere source is round: it has no second axis or orientation"
PROBLEMS = {
    "sie": Problem(
        "sie.toml",
        ("sigma", "sigma2", "theta", "xiX", "xiY"),
        {"sigma2": SPHERE, "theta": SPHERE},
        0.0508,
        12,
        12,
        auxiliary=("einsteinradius", "ellipseratio", "orientation", "R", "phi"),
        # Beside them, sigma unweighted collapsed in 2 runs of 3; twice the images for half the epochs, on random views:
        # identifiable mean +0.05 on both splits (docs/cosmosim_runs.md).
        auxiliary_weights=("sigma:2",),
        num_train=6000,
        epochs=5,
        options=("--augment",),
    ),
    "cluster2": Problem("cluster2.toml", ("sigma", "luminosity", "n_sersic", "xiX", "xiY"), {}, 0.1785, 24, 34),
    "cluster4": Problem("cluster4.toml", ("sigma", "luminosity", "n_sersic", "xiX", "xiY"), {}, 0.4562, 29, 39),
}


def run(script: str, *args: str) -> float:
    """Runs train.py or evaluate.py, echoing its output; returns its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, script), *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def summarize(report: dict, problem: Problem) -> dict:
    """The three means of a report's per-target R²: uniform (all the problem's targets), identifiable parameters,
    amplitudes; and how many targets the uniform mean counts. Auxiliary targets count in none."""
    r2 = {name: p["r2"] for name, p in report["parameters"].items() if name not in problem.auxiliary}
    identifiable = [r2[n] for n in problem.parameters if n in r2 and n not in problem.not_identifiable]
    amplitudes = [value for name, value in r2.items() if name.startswith(("alpha[", "beta["))]
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {
        "uniform": mean(list(r2.values())),
        "identifiable": mean(identifiable),
        "amplitudes": mean(amplitudes),
        "scored": len(r2),
    }


def table(name: str, problem: Problem, reports: dict[str, dict]) -> str:
    test, validation = reports["test"], reports["validation"]
    lines = [
        f"### {name} ({problem.toml})",
        "",
        "| target | test R² | test MAE | validation R² | note |",
        "|---|---|---|---|---|",
    ]
    for target, p in test["parameters"].items():
        note = "angle (circular)" if "period" in p else ""
        if target in problem.not_identifiable:
            note = f"not identifiable: {problem.not_identifiable[target]}"
        if target in problem.auxiliary:
            note = "auxiliary: trained alongside, out of the means"
        v = validation["parameters"][target]["r2"]
        lines.append(f"| {target} | {p['r2']:.3f} | {p['mae']:.4g} | {v:.3f} | {note} |")
    ours_test, ours_validation = summarize(test, problem), summarize(validation, problem)
    lines += [
        "",
        "| mean R² | test | validation | theirs (best validation) |",
        "|---|---|---|---|",
        f"| uniform, all {ours_test['scored']} targets | {ours_test['uniform']:.3f} | "
        f"{ours_validation['uniform']:.3f} | {problem.their_best:.3f} (epoch {problem.their_epoch} of "
        f"{problem.their_epochs}) |",
        f"| identifiable parameters | {ours_test['identifiable']:.3f} | {ours_validation['identifiable']:.3f} | – |",
        f"| amplitudes | {ours_test['amplitudes']:.3f} | {ours_validation['amplitudes']:.3f} | – |",
    ]
    return "\n".join(lines)


def train_options(problem: Problem, workdir: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """train.py's options for one problem: simulate it, its targets (with --auxiliary its auxiliary targets and
    their weights, unless `extra`, the options after --, gives --target-weights), the split sizes and epochs (the
    problem's CPU setting where args leaves them None), the problem's own options, then `extra`."""
    targets = (*problem.parameters, AMPLITUDES, *(problem.auxiliary if args.auxiliary else ()))
    options = [
        "--simulate", os.path.join("bench", "problems", problem.toml),
        "--targets", ",".join(targets),
        "--image-size", str(args.image_size),
        "--num-train", str(args.num_train or problem.num_train),
        "--num-validation", str(args.num_validation),
        "--num-test", str(args.num_test),
        "--epochs", str(args.epochs or problem.epochs),
        "--workdir", workdir,
    ]  # fmt: skip
    if args.data_dir:
        options += ["--data-dir", args.data_dir]
    users_weights = any(option == "--target-weights" or option.startswith("--target-weights=") for option in extra)
    if args.auxiliary and problem.auxiliary_weights and not users_weights:
        options += ["--target-weights", ",".join(problem.auxiliary_weights)]
    return [*options, *problem.options, *extra]


def epochs_within(seconds_left: float, epoch_seconds: float, most: int) -> int:
    """How many epochs of `epoch_seconds` fit `seconds_left` after RESERVE_SECONDS: at least 1, at most `most`."""
    return max(1, min(most, int((seconds_left - RESERVE_SECONDS) // epoch_seconds)))


def with_epochs(args: argparse.Namespace, epochs: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "epochs": epochs})


def last_epoch_seconds(workdir: str) -> float:
    """The last epoch's seconds (training and validation) in a run's metrics.jsonl. Read here rather than with
    jaxnets.monitor.read_history: the script drives train.py and evaluate.py as a user does and imports no jaxnets,
    so it runs where only the checkout is (a lent GPU)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()][-1]["seconds"]


def calibrated_epochs(problem: Problem, workdir: str, args: argparse.Namespace, extra: list[str]) -> tuple[int, float]:
    """--time-budget: trains one epoch in `workdir`-calibration (which also simulates and converts the images and
    fills the compilation cache that the run then reads); returns how many epochs fit what is left, and the
    calibration's seconds."""
    calibration = f"{workdir}-calibration"
    seconds = run("train.py", *train_options(problem, calibration, with_epochs(args, 1), extra), "--no-refit-head")
    epoch_seconds = last_epoch_seconds(calibration)
    epochs = epochs_within(args.time_budget - seconds, epoch_seconds, args.epochs or MOST_EPOCHS)
    print(f"calibration: {seconds:.0f} s, an epoch {epoch_seconds:.1f} s: {epochs} epochs fit", flush=True)
    return epochs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma-separated, of {', '.join(PROBLEMS)}")
    parser.add_argument("--image-size", type=int, default=128)
    cpu_setting = ", ".join(f"{name} {p.num_train} × {p.epochs}" for name, p in PROBLEMS.items())
    parser.add_argument("--num-train", type=int, help=f"training images (default, images × epochs: {cpu_setting})")
    parser.add_argument("--num-validation", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, help="default: the problem's CPU setting, as for --num-train")
    parser.add_argument("--runs", default="runs/bench", help="workdirs go to <runs>/<problem>")
    parser.add_argument("--data-dir", default=None, help="TFDS folder (the simulation is cached there)")
    parser.add_argument("--out", default="bench/cosmosim_problems.json")
    parser.add_argument(
        "--auxiliary",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train on what the simulation records (the problem's auxiliary targets, sie's only), scored "
        "apart, with the problem's target weights for them (sie: sigma:2) unless --target-weights is given after --",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds for each problem: a one-epoch calibration run, then as many epochs as fit (at most --epochs, "
        f"else {MOST_EPOCHS}), less {RESERVE_SECONDS} s for the run's start and the evaluations",
    )
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]

    results = {}
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        workdir = os.path.join(args.runs, name)
        seconds = {}
        if args.time_budget:
            epochs, seconds["calibration"] = calibrated_epochs(problem, workdir, args, extra)
            options = train_options(problem, workdir, with_epochs(args, epochs), extra)
        else:
            options = train_options(problem, workdir, args, extra)
        seconds["train"] = run("train.py", *options)
        reports, as_trained = {}, {}
        for split in ("validation", "test"):
            # The head as trained first, then evaluate.py's default (with the head train.py refitted, where it kept
            # one), whose files stay in the workdir; both with the 8 views averaged.
            for refit, kept in (("--no-refit", as_trained), ("--refit", reports)):
                key = f"evaluate {split}" + (" (as trained)" if kept is as_trained else "")
                seconds[key] = run("evaluate.py", "--workdir", workdir, "--split", split, refit)
                with open(os.path.join(workdir, f"eval_{split}.json")) as f:
                    kept[split] = json.load(f)
        results[name] = {
            "seconds": seconds,
            "summary": {split: summarize(report, problem) for split, report in reports.items()},
            "summary_as_trained": {split: summarize(report, problem) for split, report in as_trained.items()},
            "reports": reports,
            "settings": {**vars(args), "extra": extra, "train.py": options},
        }
        print(table(name, problem, reports), flush=True)
        print(f"head as trained (evaluate.py --no-refit): {results[name]['summary_as_trained']}", flush=True)
        print(f"wall clock: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}\n", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
