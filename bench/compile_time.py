"""Where the train step's cold compile goes, and what an XLA compiler option changes (the performance issue's
compile target).

XLA:CPU's own timers (its log at `TF_CPP_VMODULE=cpu_compiler=1,ir_compiler=1`, switched on here) split the
compile of Inception3's train step into HLO passes, IR emission and the kernels' LLVM compiles; the script sums
them by kernel kind. With --option, the step is also compiled with those compiler options and then both programs
are stepped alternately, medians of --rounds (the first compile in a process pays for its warm-up: run once with
--option-first to compile the option's program first).

    python bench/compile_time.py --precision f32 --slowest 12                           # the anatomy
    python bench/compile_time.py --precision bf16 --option xla_backend_optimization_level=1

XLA's CPU switches in `xla_backend_extra_options` (xla_cpu_disable_loop_unrolling, xla_cpu_optimize_for_size) are
not accepted as per-program options: set them for the whole process,
`XLA_FLAGS=--xla_backend_extra_options=xla_cpu_disable_loop_unrolling`, and compare runs with and without.
"""

import os

if __name__ == "__main__":  # XLA reads these when it starts: before jax is imported
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "cpu_compiler=1,ir_compiler=1"

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from remat import random_batch, time_alternately  # noqa: E402  (bench/, the script's folder)

from jaxnets import conv, host_memory, losses, training  # noqa: E402
from jaxnets.models import Inception3  # noqa: E402

# XLA's timer lines end "time: 28.4 ms (28354 us) (cumulative: ...)": the microseconds are read.
KERNEL = re.compile(r"Compiled LLVM module: __compute_module_(\S+?)_kernel_module time: [^(]*\((\d+) us\)")
PASSES = re.compile(r"Running HLO passes on \[jit_train_step\] for CPU time: [^(]*\((\d+) us\)")
CODEGEN = re.compile(r"Compiling \[jit_train_step\] for CPU using JIT time: [^(]*\((\d+) us\)")


def _train_step_log(log: str) -> str:
    """The log from the train step's compile on: programs compiled before it left out."""
    return log[max(log.rfind("Running HLO passes on [jit_train_step]"), 0) :]


def _kernels(log: str) -> list[tuple[str, int]]:
    """(kernel, microseconds) of each kernel LLVM compiled in the log."""
    return [(kernel, int(microseconds)) for kernel, microseconds in KERNEL.findall(log)]


def anatomy(log: str) -> dict:
    """The train step's compile from XLA's log: HLO passes, the rest of the compile (IR emission and LLVM, seconds
    of wall clock), and the kernels' LLVM compiles summed over threads, in all and per kernel kind."""
    log = _train_step_log(log)
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for kernel, microseconds in _kernels(log):
        kind = re.sub(r"\.\d+$", "", kernel)  # pad_slice_fusion.192 is a pad_slice_fusion
        kernels[kind][0] += 1
        kernels[kind][1] += microseconds / 1e6
    passes, codegen = PASSES.search(log), CODEGEN.search(log)
    if passes is None or codegen is None:
        raise ValueError("XLA's log has no timer lines for jit_train_step (TF_CPP_VMODULE unset, or a new format)")
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:8]
    return {
        "hlo_passes_s": round(int(passes[1]) / 1e6, 2),
        "codegen_s": round(int(codegen[1]) / 1e6, 2),
        "kernels": sum(count for count, _ in kernels.values()),
        "kernel_llvm_s_summed": round(sum(seconds for _, seconds in kernels.values()), 2),
        "largest_kinds": {kind: {"kernels": count, "llvm_s": round(seconds, 2)} for kind, (count, seconds) in top},
    }


def slowest(log: str, hlo: str, count: int) -> list[dict]:
    """The `count` kernels of the train step whose LLVM compile took longest, with the shape each one writes."""
    shapes = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (\S+) ", hlo, re.M))
    timed = sorted(((microseconds, kernel) for kernel, microseconds in _kernels(_train_step_log(log))), reverse=True)
    return [
        {"kernel": kernel, "llvm_ms": microseconds // 1000, "writes": shapes.get(kernel, "?").split("{")[0]}
        for microseconds, kernel in timed[:count]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE, an XLA compiler option to compare")
    parser.add_argument("--option-first", action="store_true", help="compile the option's program first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--slowest", type=int, default=0, help="list this many kernels, slowest LLVM compile first")
    args = parser.parse_args()
    try:
        options = dict(option.split("=", 1) for option in args.option)
    except ValueError:
        parser.error(f"--option takes NAME=VALUE, got {args.option}")

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    state = training.TrainState.create(Inception3(6, in_channels=1, dtype=dtype, rngs=nnx.Rngs(0)), optax.adam(1e-3))
    batch = random_batch(args.batch, args.size)
    step = training.make_train_step(losses.mse, donate=False)
    with host_memory.collector_paused():  # as train.py traces its step
        lowered = step.lower(state, batch)
    base = dict(conv.COMPILER_OPTIONS) if conv.cpu_tuned() else {}
    variants = {"default": base} | ({"option": base | options} if options else {})
    order = list(variants)[::-1] if args.option_first else list(variants)

    compiled, seconds = {}, {}
    with tempfile.TemporaryFile("w+") as log:  # XLA logs to file descriptor 2: catch it there
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            for name in order:
                started = time.perf_counter()
                compiled[name] = lowered.compile(compiler_options=variants[name])
                seconds[name] = time.perf_counter() - started
                host_memory.release_freed_memory()
                if name == order[0]:
                    sys.stderr.flush()
                    log.flush()
                    log.seek(0)
                    first_log = log.read()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "precision": args.precision,
        "batch": args.batch,
        "size": args.size,
        "options": options,
        "compiled_first": order[0],
        "compile_s": {name: round(value, 2) for name, value in seconds.items()},
        "anatomy_of_first": anatomy(first_log),
    }
    if args.slowest:
        result["slowest_kernels_of_first"] = slowest(first_log, compiled[order[0]].as_text(), args.slowest)
    if len(compiled) > 1:
        for name in compiled:  # warm-up
            jax.block_until_ready(compiled[name](state, batch))
        times = time_alternately(compiled, {name: state for name in compiled}, batch, args.rounds, args.steps)
        result["step_s_median"] = {name: round(statistics.median(values), 4) for name, values in times.items()}
        result["step_time_ratio"] = round(result["step_s_median"]["option"] / result["step_s_median"]["default"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
