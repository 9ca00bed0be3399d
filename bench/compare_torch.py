"""Side-by-side benchmark: the lecture's Inception3 loop in jaxnets and in PyTorch/torchvision.

Each side runs in its own worker process (so peak memory is measured separately); the parent alternates
timed blocks between them, excludes warm-up, and reports medians and the jaxnets/PyTorch ratio as a
table and one JSON line. On CPU PyTorch runs float32, the lecture's, and jaxnets each --precision (evaluation too:
evaluate.py runs a model in the precision it was trained in). `--device` compares on the accelerator: jaxnets bf16
against torchvision's Inception3 with AMP bf16 and channels_last, both eager and `torch.compile`, all on the same
GPU in the same run, and profiles the jaxnets steps (op time by category; the raw trace is kept for reading
elsewhere).

    python bench/compare_torch.py                 # all CPU cases (takes ~15 minutes on 2 cores)
    python bench/compare_torch.py --cases train128 --rounds 5
    python bench/compare_torch.py --device --profile-dir DIR  # GPU: train b256 and eval b512, 3x299 bf16
"""

import argparse
import collections
import contextlib
import datetime
import functools
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# Forward FLOPs of Inception3 per 3x299x299 image (conv + matmul); training is ~3x forward.
FORWARD_GFLOP_299 = 11.42
CASES = {
    # name: (mode, batch, channels, size)
    "train128": ("train", 32, 1, 128),
    "train299": ("train", 16, 3, 299),
    "eval299": ("eval", 64, 3, 299),
    # The CosmoAI group's problems as evaluated on CPU (bench/cosmosim_problems.py): not by default.
    "eval128": ("eval", 32, 1, 128),
}
DEVICE_CASES = {
    "gpu-train299": ("train", 256, 3, 299),
    "gpu-eval299": ("eval", 512, 3, 299),
    # The CosmoAI group's setting (batch 32, grey 256 px), where an H200 trained slowly (README, GPU): not by default.
    "gpu-train256-b32": ("train", 32, 1, 256),
}
DEFAULT_DEVICE_CASES = "gpu-train299,gpu-eval299"
# jax@DIR: jaxnets imported from the checkout DIR (to compare two versions); torch: eager, AMP bf16, channels_last;
# torch-compile: the same under torch.compile.
GPU_SIDES = "jax,torch,torch-compile"
NUM_OUTPUTS = 6  # x, y, einsteinR, sigma, sigma2, theta
HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE_STEPS = 5  # steps traced by a jax worker with $JAXNETS_BENCH_PROFILE


# ---------------------------------------------------------------------------------------------
# Workers: build one side, warm up, then answer "run N" with the seconds N steps took.


def jax_worker(mode: str, batch: int, channels: int, size: int, precision: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jaxnets import host_memory, losses, step_cache, training
    from jaxnets.models import Inception3

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    tx = optax.adam(1e-3)

    def new_state():
        return training.TrainState.create(
            Inception3(NUM_OUTPUTS, in_channels=channels, dtype=dtype, rngs=nnx.Rngs(0)), tx
        )

    mesh = training.data_mesh()
    # As train.py: the train step compiles for the state's shapes before the weights are made (evaluate.py restores
    # its weights first).
    state = training.replicated_shapes(new_state, mesh) if mode == "train" else training.replicate(new_state(), mesh)
    rng = np.random.default_rng(0)
    data = training.shard_batch(
        {
            "image": rng.random((batch, size, size, channels), np.float32),
            "target": rng.normal(size=(batch, NUM_OUTPUTS)).astype(np.float32),
            "mask": np.ones(batch, np.float32),
        },
        mesh,
    )
    # With the persistent cache, train.py's way: the traced step kept beside it.
    cache = step_cache.StepCache(os.environ["JAXNETS_BENCH_CACHE"]) if "JAXNETS_BENCH_CACHE" in os.environ else None
    started = time.perf_counter()
    with host_memory.collector_paused():  # as train_and_evaluate traces and compiles its step
        if mode == "train":
            compiled = training.lower_train_step(losses.mse, state, data, cache)()
        else:
            compiled = training.make_eval_step(losses.mse).lower(state, data).compile()
    compile_seconds = time.perf_counter() - started
    host_memory.release_freed_memory()  # as train_and_evaluate does after compiling
    if mode == "train":
        state = training.replicate(new_state(), mesh)

    def run(n):
        nonlocal state
        for _ in range(n):
            if mode == "train":
                state, metrics = compiled(state, data)
            else:
                metrics = compiled(state, data)
        jax.block_until_ready(metrics)

    def finish() -> dict:
        info = {}
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            info["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        profile_dir = os.environ.get("JAXNETS_BENCH_PROFILE")
        if profile_dir:
            with jax.profiler.trace(profile_dir):
                run(PROFILE_STEPS)
            try:
                info["profile"] = summarise_profile(profile_dir)
            except Exception as error:  # the timings stand without it
                info["profile_error"] = repr(error)
        return info

    serve(run, {"compile_seconds": compile_seconds, "device": str(jax.devices()[0].device_kind)}, finish)


def torch_worker(
    mode: str, batch: int, channels: int, size: int, precision: str, gpu: bool = False, compiled: bool = False
) -> None:
    """CPU: float32, as the lecture runs it. GPU: AMP bf16, channels_last, cuDNN autotuning, fused Adam."""
    import torch
    import torchvision

    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"  # the report names the device used
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = torchvision.models.Inception3(num_classes=NUM_OUTPUTS, aux_logits=False, init_weights=True)
    if channels != 3:
        model.Conv2d_1a_3x3.conv = torch.nn.Conv2d(channels, 32, kernel_size=3, stride=2, bias=False)
    images = torch.rand(batch, channels, size, size)
    targets = torch.randn(batch, NUM_OUTPUTS)
    autocast = contextlib.nullcontext
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(device, memory_format=torch.channels_last)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)
        autocast = functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    forward = torch.compile(model) if compiled else model
    if mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device == "cuda")
        criterion = torch.nn.MSELoss()

        def run(n):
            for _ in range(n):
                optimizer.zero_grad()
                with autocast():
                    loss = criterion(forward(images), targets)
                loss.backward()
                optimizer.step()
            loss.item()
    else:
        model.eval()

        def run(n):
            with torch.no_grad(), autocast():
                for _ in range(n):
                    result = forward(images).sum()
            result.item()

    def finish() -> dict:
        return {"device_peak_mib": torch.cuda.max_memory_allocated() / 2**20} if device == "cuda" else {}

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    serve(run, {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__}, finish)


def serve(run, info: dict, finish=dict) -> None:
    """Warms up, says it is ready, times "run N" commands; on "quit" reports peak memory and `finish()`'s extras."""
    run(2)  # warm-up: first steps allocate and finish compiling (XLA's autotuning, torch.compile)
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
    print(json.dumps({"peak_rss_mib": peak_mib, **finish()}), flush=True)


class Worker:
    """One side in its own process; the constructor returns once it is ready (built, compiled, warmed up). With
    `timeout`, a side that takes longer is killed and the constructor raises."""

    def __init__(self, side: str, case: str, precision: str, env: dict | None = None, timeout: float | None = None):
        env = {**os.environ, **(env or {})}
        side, _, checkout = side.partition("@")
        if checkout:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(checkout), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", side, "--cases", case, "--precision", precision],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        timer = threading.Timer(timeout, self.process.kill) if timeout else None
        if timer:
            timer.start()
        try:
            self.info = self._read()
        finally:
            if timer:
                timer.cancel()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        while line and not line.startswith("{"):  # a library's message on stdout
            print(line, end="", file=sys.stderr)
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


def kernel_kind(name: str) -> str:
    """What a GPU kernel of the Inception3 step does, read from its name (cuDNN, cuBLAS or an XLA fusion)."""
    if "xmma" in name or "cutlass" in name or "convolve" in name:
        if "dgrad" in name:
            return "convolution, input gradient"
        return "convolution, kernel gradient" if "wgrad" in name else "convolution, forward"
    for marker, kind in (
        ("nvjet", "matrix product (1x1 convolutions, fc)"),
        ("gemm", "matrix product (1x1 convolutions, fc)"),
        ("reduce", "reductions (BatchNorm statistics and gradients)"),
        ("maximum", "max: ReLU, max pool"),
        ("select", "max: ReLU, max pool"),
        ("concatenate", "concatenation of the branches"),
        ("convert", "dtype conversions"),
        ("transpose", "copies, transposes"),
        ("copy", "copies, transposes"),
        ("fusion", "other elementwise"),
    ):
        if marker in name:
            return kind
    return "other (adds, memsets)"


def xplane_file(trace: str) -> str:
    """The .xplane.pb of a jax.profiler trace: the file itself, or the one file in the folder given."""
    if os.path.isdir(trace):
        (trace,) = glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True)
    return trace


def summarise_profile(trace: str, steps: int = PROFILE_STEPS) -> dict:
    """Device kernel time per step from a jax.profiler trace of `steps` steps (a folder holding one .xplane.pb,
    or the file): by kind of kernel, and the largest kernels."""
    from jax._src.profiler import ProfileData

    trace = xplane_file(trace)
    kinds, kernels, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(trace).planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                for event in line.events:
                    kind, milliseconds = kernel_kind(event.name), event.duration_ns / 1e6 / steps
                    kinds[kind] += milliseconds
                    counts[kind] += 1 / steps
                    kernels[event.name[:120]] += milliseconds
    total = sum(kinds.values())
    return {
        "trace": trace,
        "kernel_ms_per_step": round(total, 2),
        "kernels_per_step": round(sum(counts.values())),
        "by_kind": {
            k: {"ms": round(v, 2), "share": round(v / total, 3), "kernels": round(counts[k])}
            for k, v in kinds.most_common()
        },
        "top_kernels_ms": {k: round(v, 3) for k, v in kernels.most_common(25)},
    }


def step_gflop(mode: str, size: int) -> float:
    """GFLOP per image of a train (3x the forward) or eval step at size x size: 299's scaled by the area (a grey
    stem's first layer, 0.3 % of the work, counted as colour)."""
    return (3 if mode == "train" else 1) * FORWARD_GFLOP_299 * (size / 299) ** 2


def device_comparison(args) -> list[dict]:
    """Each case's sides on the same GPU, in their own processes, timed alternately (medians of `rounds` blocks)."""
    results = []
    for case in args.device_cases.split(","):
        mode, batch, _, size = DEVICE_CASES[case]
        sides = args.sides.split(",")
        # JAX takes 75 % of the GPU by default; leave the other sides room beside it (b256 needs ~9 GB).
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(round(min(0.4, 0.9 / len(sides)), 3))}
        # One side at a time builds and warms up: XLA's and cuDNN's autotuning time kernels on the GPU, which a
        # neighbour's work would distort.
        workers = {}
        for side in sides:
            if args.profile_dir:
                env["JAXNETS_BENCH_PROFILE"] = os.path.join(args.profile_dir, f"{case}-{side.replace(os.sep, '_')}")
            started = time.perf_counter()
            try:
                worker = Worker(side, case, "bf16", env, timeout=args.ready_timeout)
            except (RuntimeError, json.JSONDecodeError) as error:  # one failing side must not cost the others
                print(f"{case} {side}: {error}", file=sys.stderr, flush=True)
                continue
            workers[side] = worker
            print(f"{case} {side}: ready after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        rates = {side: [] for side in workers}
        for _ in range(args.rounds):
            for side, worker in list(workers.items()):
                try:
                    rates[side].append(args.steps * batch / worker.time(args.steps))
                except (RuntimeError, json.JSONDecodeError, BrokenPipeError) as error:
                    print(f"{case} {side}: {error}", file=sys.stderr, flush=True)
                    del workers[side]
        flop = step_gflop(mode, size) * 1e9
        for side, worker in workers.items():
            end = worker.close()
            rate = statistics.median(rates[side])
            results.append(
                {
                    "case": case,
                    "side": side,
                    "device": worker.info["device"],
                    "batch": batch,
                    "img_s": round(rate, 1),
                    "rounds_img_s": [round(r, 1) for r in rates[side]],
                    "mfu": round(rate * flop / (args.peak_tflops * 1e12), 3),
                    "compile_s": round(worker.info["compile_seconds"], 1) if "compile_seconds" in worker.info else None,
                    "device_peak_mib": round(end["device_peak_mib"]) if "device_peak_mib" in end else None,
                    "peak_rss_mib": round(end["peak_rss_mib"]),
                    "versions": {k: worker.info[k] for k in ("torch", "torchvision") if k in worker.info},
                    **({"profile": end["profile"]} if "profile" in end else {}),
                }
            )
            r = results[-1]
            print(
                f"{case:<13} {side:<14} b{batch} {r['img_s']:8.1f} img/s  MFU {r['mfu']:.3f}  "
                f"device peak {r['device_peak_mib']} MiB  rounds {r['rounds_img_s']}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="train128,train299,eval299")
    parser.add_argument("--precision", default="f32,bf16", help="jaxnets precisions to compare (PyTorch: f32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="steps per timed block (default: 3 on CPU, 20 with --device)")
    parser.add_argument(
        "--device", action="store_true", help="GPU: jaxnets vs PyTorch eager and compiled, AMP bf16, channels_last"
    )
    parser.add_argument("--sides", default=GPU_SIDES, help="with --device: jax, jax@CHECKOUT, torch, torch-compile")
    parser.add_argument(
        "--device-cases", default=DEFAULT_DEVICE_CASES, help=f"with --device, of {', '.join(DEVICE_CASES)}"
    )
    parser.add_argument("--profile-dir", help="with --device: profile the jaxnets steps into this folder")
    parser.add_argument(
        "--ready-timeout", type=float, default=240, help="with --device: seconds a side may take to build and compile"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    parser.add_argument("--summarise-trace", metavar="XPLANE", help="print the kernel time of a fetched trace and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.summarise_trace:
        summary = summarise_profile(args.summarise_trace)
        for kind, row in summary["by_kind"].items():
            print(f"{kind:<50} {row['ms']:7.2f} ms  {100 * row['share']:5.1f} %  {row['kernels']:5d} kernels")
        print(f"{'all kernels':<50} {summary['kernel_ms_per_step']:7.2f} ms          {summary['kernels_per_step']:5d}")
        return
    if args.worker:
        if args.worker == "jax":
            from jaxnets import host_memory

            host_memory.restart_with_huge_pages()  # as train.py and evaluate.py do
        if "JAXNETS_BENCH_CACHE" in os.environ:
            import jax

            jax.config.update("jax_compilation_cache_dir", os.environ["JAXNETS_BENCH_CACHE"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        spec = {**CASES, **DEVICE_CASES}[args.cases]
        if args.worker == "jax":
            jax_worker(*spec, args.precision)
        else:
            gpu = args.cases in DEVICE_CASES
            torch_worker(*spec, args.precision, gpu, compiled=args.worker == "torch-compile")
        return
    args.steps = args.steps or (20 if args.device else 3)
    if len(set(args.sides.split(","))) != len(args.sides.split(",")):
        parser.error(f"--sides names a side twice ({args.sides}); more --rounds time it more often")
    unknown = [case for case in args.cases.split(",") if case not in CASES] if not args.device else []
    if unknown:
        parser.error(f"--cases {','.join(unknown)}: the CPU cases are {', '.join(CASES)}")

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
        print(json.dumps({**header, "peak_tflops_assumed": args.peak_tflops, "results": device_comparison(args)}))
        return
    results = []
    for case in args.cases.split(","):
        for precision in args.precision.split(","):
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
