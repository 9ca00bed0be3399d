"""The whole head of a trained run fine-tuned with squared error on its frozen pooled features: does it beat the
least-squares refit of its last layer (`train.py --refit-head`)?

Keeps the backbone of a bench/cosmosim_problems.py run (the best checkpoint, eval mode) and reads its pooled features
(the 2048 values the head reads) for the training images as they are and for the validation and test images in the
square's 8 rotations and mirrors (cached in --cache); then trains the head (2048-1024-512-n, started from its trained
weights, in float32) with Adam at each --lr for --epochs on the mean squared error to the encoded targets, batch 128,
scores validation (8 views averaged, as evaluate.py) after every epoch, and reports validation and test at the epoch
with the best validation R² mean over every target, with the problem's means (docs/cosmosim_runs.md, "The whole head
refitted"). `train.py --refit-head` now fine-tunes the head so at lr 3e-4 for at most 30 epochs (`jaxnets.refit`);
this script tries other rates and epochs and shows the test split.

    python bench/head_refit.py RUN_DIR --problem sie --lr 3e-4,1e-3 --epochs 100
"""

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from cosmosim_problems import PROBLEMS, summarize  # bench/ is on sys.path when run as a script
from flax import nnx
from refit_head import averaged_report, load_trained_run, read_views

from jaxnets import refit
from jaxnets.data.symmetry import SYMMETRIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--problem", required=True, choices=sorted(PROBLEMS))
    parser.add_argument("--lr", default="3e-4", help="comma-separated Adam learning rates")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--cache", help="an .npz file for the features (read when it exists)")
    parser.add_argument("--out", help="write the report here as JSON")
    args = parser.parse_args()

    run = load_trained_run(args.workdir)
    model = run.state.model(train=False)
    trained = refit.without_head(model)  # the model then returns the pooled features
    pooled = nnx.jit(lambda model, images: model(images).astype(jnp.float32))
    apply = nnx.jit(lambda head, x: head(x).astype(jnp.float32))

    def read(split: str, views) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The split's pooled features in each view, its raw targets and its encoded targets."""
        return read_views(run, lambda images: pooled(model, images), split, views)

    started = time.perf_counter()
    if args.cache and os.path.exists(args.cache):
        saved = np.load(args.cache)
        train_x, train_y = saved["train_x"], saved["train_y"]
        splits = {s: ([saved[f"{s}_{v}"] for v in range(8)], saved[f"{s}_true"]) for s in ("validation", "test")}
    else:
        (train_x,), _, train_y = read("train", SYMMETRIES[:1])
        splits = {s: read(s, SYMMETRIES)[:2] for s in ("validation", "test")}
        if args.cache:
            views = {f"{s}_{v}": splits[s][0][v] for s in splits for v in range(8)}
            np.savez(
                args.cache, train_x=train_x, train_y=train_y, **views, **{f"{s}_true": splits[s][1] for s in splits}
            )
    print(f"features in {time.perf_counter() - started:.0f} s", flush=True)
    problem = PROBLEMS[args.problem]

    def scored(head, split: str) -> tuple[dict, float]:
        views, true = splits[split]
        parameters = averaged_report(run, [np.asarray(apply(head, jnp.asarray(view))) for view in views], true)
        every = float(np.nanmean([p["r2"] for p in parameters.values()]))
        return summarize({"parameters": parameters}, problem), every

    results = {"as trained": {split: scored(trained, split)[0] for split in splits}}
    print("as trained", results["as trained"], flush=True)
    for lr in (float(value) for value in args.lr.split(",")):
        best = (-np.inf, 0, trained)

        def on_epoch(epoch: int, head: nnx.Module, lr: float = lr) -> None:
            nonlocal best
            means, every = scored(head, "validation")
            if every > best[0]:
                best = (every, epoch, head)
            if epoch % 10 == 0:
                print(f"lr {lr:g} epoch {epoch}: validation {means}", flush=True)

        refit.fine_tune_head(trained, train_x, train_y, on_epoch, epochs=args.epochs, lr=lr)
        _, epoch, head = best
        results[f"lr {lr:g}"] = {"epoch": epoch, **{split: scored(head, split)[0] for split in splits}}
        print(f"lr {lr:g}, chosen on validation:", results[f"lr {lr:g}"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
