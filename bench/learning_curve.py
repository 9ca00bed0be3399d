"""How fast does Inception3 learn the lens parameters? Test R² per parameter against training steps.

Used to choose train.py's defaults (image size, dataset size, epochs): the number of steps to reach the
R² targets does not depend on the device, so it can be measured on a GPU and spent on a CPU.

    python bench/learning_curve.py --image-size 75 --steps 1200 --configs "dropout=0.5;dropout=0"
"""

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxnets import losses, training
from jaxnets.data import lens
from jaxnets.models import Inception3


def r2(true: np.ndarray, predicted: np.ndarray) -> list[float]:
    return (1 - ((predicted - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)).round(4).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-validation", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument(
        "--configs",
        default="dropout=0.5",
        help="';'-separated Inception3 keyword sets, e.g. 'dropout=0.5;dropout=0;head_features=1024,512'",
    )
    args = parser.parse_args()

    images, params, _ = lens.generate(args.num_train + args.num_validation, args.image_size, seed=0)
    images = images.astype(np.float32) / 255
    mean, std = params[: args.num_train].mean(0), params[: args.num_train].std(0)
    targets = ((params - mean) / std).astype(np.float32)
    train = (images[: args.num_train], targets[: args.num_train])
    validation = [
        {
            "image": images[i : i + 250],
            "target": targets[i : i + 250],
            "mask": np.ones(250, np.float32),
            "index": np.arange(i, i + 250),
        }
        for i in range(args.num_train, args.num_train + args.num_validation, 250)
    ]
    mesh = training.data_mesh()
    for text in args.configs.split(";"):
        kwargs = {}
        for item in filter(None, text.split(",") if "=" not in text else [text]):
            key, value = item.split("=")
            kwargs[key] = tuple(int(v) for v in value.split(",")) if key == "head_features" else float(value)
        model = Inception3(len(lens.PARAM_NAMES), in_channels=1, rngs=nnx.Rngs(0), **kwargs)
        state = training.replicate(training.TrainState.create(model, optax.adam(args.lr)), mesh)
        train_step = training.make_train_step(losses.mse)
        eval_step = training.make_eval_step(losses.mse, with_predictions=True)
        rng, order, position, started = np.random.default_rng(0), np.arange(0), 0, time.perf_counter()
        for step in range(1, args.steps + 1):
            if position + args.batch_size > len(order):
                order, position = rng.permutation(args.num_train), 0
            rows = order[position : position + args.batch_size]
            position += args.batch_size
            batch = {"image": train[0][rows], "target": train[1][rows], "mask": np.ones(len(rows), np.float32)}
            state, metrics = train_step(state, training.shard_batch(batch, mesh))
            if step % args.eval_every == 0:
                result = training.evaluate(state, validation, eval_step, mesh, with_predictions=True)
                print(
                    json.dumps(
                        {
                            "config": text,
                            "step": step,
                            "images_seen": step * args.batch_size,
                            "train_loss": training.summarize(metrics)["loss"],
                            "validation_loss": round(result["loss"], 4),
                            "r2": dict(
                                zip(lens.PARAM_NAMES, r2(result["targets"], result["predictions"]), strict=True)
                            ),
                            "seconds": round(time.perf_counter() - started, 1),
                            "device": jax.devices()[0].device_kind,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
