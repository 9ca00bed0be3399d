"""Side-by-side benchmark: the lecture's Inception3 loop in jaxnets and in PyTorch/torchvision.

Each side runs in its own worker process (so peak memory is measured separately); the parent alternates
timed blocks between them, excludes warm-up, and reports medians and the jaxnets/PyTorch ratio as a
table and one JSON line. `--device` runs only the jaxnets side on the accelerator and reports MFU.

    python bench/compare_torch.py                 # all CPU cases (takes ~15 minutes on 2 cores)
    python bench/compare_torch.py --cases train128 --rounds 5
    python bench/compare_torch.py --device        # GPU: train b256 3x299 bf16, images/s and MFU
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Forward FLOPs of Inception3 per 3x299x299 image (conv + matmul); training is ~3x forward.
FORWARD_GFLOP_299 = 11.42
CASES = {
    # name: (mode, batch, channels, size)
    "train128": ("train", 32, 1, 128),
    "train299": ("train", 16, 3, 299),
    "eval299": ("eval", 64, 3, 299),
}
NUM_OUTPUTS = 6  # x, y, einsteinR, sigma, sigma2, theta
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Workers: build one side, warm up, then answer "run N" with the seconds N steps took.


def jax_worker(mode: str, batch: int, channels: int, size: int, precision: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jaxnets import host_memory, losses, training
    from jaxnets.models import Inception3

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    model = Inception3(NUM_OUTPUTS, in_channels=channels, dtype=dtype, rngs=nnx.Rngs(0))
    state = training.TrainState.create(model, optax.adam(1e-3))
    mesh = training.data_mesh()
    state = training.replicate(state, mesh)
    rng = np.random.default_rng(0)
    data = training.shard_batch(
        {
            "image": rng.random((batch, size, size, channels), np.float32),
            "target": rng.normal(size=(batch, NUM_OUTPUTS)).astype(np.float32),
            "mask": np.ones(batch, np.float32),
        },
        mesh,
    )
    step = training.make_train_step(losses.mse) if mode == "train" else training.make_eval_step(losses.mse)
    started = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_seconds = time.perf_counter() - started
    host_memory.release_freed_memory()  # as train_and_evaluate does after compiling

    def run(n):
        nonlocal state
        for _ in range(n):
            if mode == "train":
                state, metrics = compiled(state, data)
            else:
                metrics = compiled(state, data)
        jax.block_until_ready(metrics)

    serve(run, {"compile_seconds": compile_seconds, "device": str(jax.devices()[0].device_kind)})


def torch_worker(mode: str, batch: int, channels: int, size: int, precision: str) -> None:
    import torch
    import torchvision

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = torchvision.models.Inception3(num_classes=NUM_OUTPUTS, aux_logits=False, init_weights=True)
    if channels != 3:
        model.Conv2d_1a_3x3.conv = torch.nn.Conv2d(channels, 32, kernel_size=3, stride=2, bias=False)
    images = torch.rand(batch, channels, size, size)
    targets = torch.randn(batch, NUM_OUTPUTS)
    if mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = torch.nn.MSELoss()

        def run(n):
            for _ in range(n):
                optimizer.zero_grad()
                loss = criterion(model(images), targets)
                loss.backward()
                optimizer.step()
            loss.item()
    else:
        model.eval()

        def run(n):
            with torch.no_grad():
                for _ in range(n):
                    model(images).sum().item()

    serve(run, {"device": "cpu", "torch": torch.__version__, "torchvision": torchvision.__version__})


def serve(run, info: dict) -> None:
    run(2)  # warm-up: first steps allocate and (for JAX) finish compiling
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            started = time.perf_counter()
            run(int(command[1]))
            print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
        else:
            break
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak_mib}), flush=True)


class Worker:
    def __init__(self, side: str, case: str, precision: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", side, "--cases", case, "--precision", precision],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args} died (exit {self.process.wait()})")
        return json.loads(line)

    def time(self, steps: int) -> float:
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> dict:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        result = self._read()
        self.process.wait()
        return result


# ---------------------------------------------------------------------------------------------


def compile_times(precision: str) -> dict:
    """Train-step compile time for train128: cold (empty persistent cache), then from the cache."""
    mode, batch, channels, size = CASES["train128"]
    with tempfile.TemporaryDirectory() as cache:
        env = {"JAXNETS_BENCH_CACHE": cache}
        cold = Worker("jax", "train128", precision, env)
        cold_seconds = cold.info["compile_seconds"]
        cold.close()
        warm = Worker("jax", "train128", precision, env)
        warm_seconds = warm.info["compile_seconds"]
        warm.close()
    return {"compile_cold_s": round(cold_seconds, 2), "compile_cached_s": round(warm_seconds, 2)}


def pipeline_rate(batch: int, size: int) -> float:
    """Images/s of the jaxnets input pipeline on the built-in lens dataset at this batch and size."""
    import numpy as np

    from jaxnets.data import load_dataset, pipeline

    with tempfile.TemporaryDirectory() as data_dir:
        dataset = load_dataset(
            "lens", image_size=size, num_train=4 * batch * 20, num_validation=batch, num_test=batch, data_dir=data_dir
        )
        stats = dataset.target_stats()
        for _ in pipeline.batches(dataset, "train", batch, train=True, epoch=0, standardize=stats):
            break
        started, images = time.perf_counter(), 0
        for b in pipeline.batches(dataset, "train", batch, train=True, epoch=1, standardize=stats):
            images += len(b["image"])
            np.asarray(b["image"]).sum()
        return images / (time.perf_counter() - started)


def compare(case: str, precision: str, rounds: int, steps: int) -> dict:
    mode, batch, channels, size = CASES[case]
    jax_side = Worker("jax", case, precision)
    torch_side = Worker("torch", case, "f32")
    jax_rates, torch_rates = [], []
    for _ in range(rounds):  # alternate so both sides see the same machine noise
        jax_rates.append(steps * batch / jax_side.time(steps))
        torch_rates.append(steps * batch / torch_side.time(steps))
    jax_peak, torch_peak = jax_side.close()["peak_rss_mib"], torch_side.close()["peak_rss_mib"]
    jax_median, torch_median = statistics.median(jax_rates), statistics.median(torch_rates)
    return {
        "case": case,
        "precision": precision,
        "batch": batch,
        "input": f"{channels}x{size}x{size}",
        "jaxnets_img_s": round(jax_median, 2),
        "pytorch_img_s": round(torch_median, 2),
        "ratio": round(jax_median / torch_median, 3),
        "jaxnets_peak_rss_mib": round(jax_peak),
        "pytorch_peak_rss_mib": round(torch_peak),
        "rounds": rounds,
        "steps_per_round": steps,
        "torch": torch_side.info.get("torch"),
    }


def device_benchmark(batch: int, steps: int, rounds: int, peak_tflops: float) -> dict:
    worker = Worker("jax", "device", "bf16", {"JAXNETS_BENCH_DEVICE_BATCH": str(batch)})
    rates = [steps * batch / worker.time(steps) for _ in range(rounds)]
    worker.close()
    rate = statistics.median(rates)
    achieved = rate * 3 * FORWARD_GFLOP_299 * 1e9
    return {
        "case": "device-train299",
        "device": worker.info["device"],
        "batch": batch,
        "precision": "bf16",
        "img_s": round(rate, 1),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / (peak_tflops * 1e12), 3),
        "peak_tflops_assumed": peak_tflops,
        "compile_s": round(worker.info["compile_seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="train128,train299,eval299")
    parser.add_argument("--precision", default="f32,bf16", help="jaxnets precisions to compare (PyTorch: f32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--device", action="store_true", help="GPU mode: jaxnets only, b256 3x299 bf16, MFU")
    parser.add_argument("--device-batch", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "jax":
            from jaxnets import host_memory

            host_memory.restart_with_huge_pages()  # as train.py and evaluate.py do
        if "JAXNETS_BENCH_CACHE" in os.environ:
            import jax

            jax.config.update("jax_compilation_cache_dir", os.environ["JAXNETS_BENCH_CACHE"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        if args.cases == "device":
            spec = ("train", int(os.environ["JAXNETS_BENCH_DEVICE_BATCH"]), 3, 299)
        else:
            spec = CASES[args.cases]
        (jax_worker if args.worker == "jax" else torch_worker)(*spec, args.precision)
        return

    import jax

    header = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "load_before": round(os.getloadavg()[0], 2),
    }
    if not args.device and header["load_before"] > 1.0:
        # PyTorch's OpenMP threads spin at barriers: another busy process on these 2 cores slows it up to 20x
        # (measured), which would flatter the ratio. Run this on an otherwise idle machine.
        print(
            f"warning: load average {header['load_before']}: other processes will distort the comparison",
            file=sys.stderr,
        )
    if args.device:
        result = device_benchmark(args.device_batch, args.steps, args.rounds, args.peak_tflops)
        print(json.dumps({**header, **result}))
        return
    results = []
    for case in args.cases.split(","):
        for precision in args.precision.split(","):
            if CASES[case][0] == "eval" and precision == "bf16":
                continue
            results.append(compare(case, precision, args.rounds, args.steps))
            r = results[-1]
            print(
                f"{r['case']:<10} {r['precision']:<5} b{r['batch']:<3} {r['input']:<10} jaxnets "
                f"{r['jaxnets_img_s']:7.2f} img/s  PyTorch {r['pytorch_img_s']:7.2f} img/s  ratio "
                f"{r['ratio']:.2f}  peak RSS {r['jaxnets_peak_rss_mib']} / {r['pytorch_peak_rss_mib']} MiB",
                flush=True,
            )
    extras = compile_times("f32")
    extras["pipeline_img_s_b32_128"] = round(pipeline_rate(32, 128), 1)
    print(
        f"compile (train128 f32): cold {extras['compile_cold_s']} s, from cache {extras['compile_cached_s']} s; "
        f"input pipeline b32 128²: {extras['pipeline_img_s_b32_128']} img/s"
    )
    print(json.dumps({**header, "results": results, **extras, "load_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
