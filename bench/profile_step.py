"""Where the CPU train (or eval) step's time goes: a `jax.profiler` trace of a few steps of Inception3, each XLA
kernel attributed to the jaxnets function that made it, through the compiled program's source locations, and
summed by what it does (the performance issue's op breakdown).

    python bench/profile_step.py --precision bf16                # b32 1x128^2
    python bench/profile_step.py --precision f32 --batch 16 --size 299 --channels 3
    python bench/profile_step.py --mode eval --batch 64 --size 299 --channels 3   # evaluate.py's step

Op time is summed over XLA's threads; a matrix product is timed on the thread that starts it.
"""

import os

if __name__ == "__main__":  # XLA reads its flags when it starts: before jax is imported
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from compare_torch import xplane_file  # noqa: E402  (bench/, the script's folder)
from flax import nnx  # noqa: E402
from remat import random_batch  # noqa: E402

from jaxnets import host_memory, losses, training  # noqa: E402
from jaxnets.models import Inception3  # noqa: E402

BATCHNORM_AND_RELU = {
    "BatchNorm2d.__call__",
    "batch_statistics",
    "batch_norm_train",
    "_normalize",
    "_batch_norm_forward",
    "BasicConv2d.activate",
    "relu",
}
# Events on XLA's threads that are not kernels: the executor and thread pools around them, and the loops and calls
# whose spans hold their bodies' kernels (the eval step's batch slices run in a while loop).
NOT_KERNELS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool")
CONTAINERS = {"while", "call", "conditional"}


def _table(hlo: str, name: str) -> dict[int, str]:
    """One of the compiled program's source tables ("FileNames", "StackFrames", ...): id -> its line."""
    match = re.search(rf"^{name}\n((?:\d+ .*\n)+)", hlo, re.M)
    rows = match.group(1).splitlines() if match else []
    return {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in rows}


def kernel_sources(hlo: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each instruction of a compiled program (`compiled.as_text()`), kernels among them: its op name and its call
    stack as (file, function), innermost first. A fusion without metadata of its own takes its body's (a concatenate's
    first)."""
    files = {key: value.strip('"') for key, value in _table(hlo, "FileNames").items()}
    functions = {key: value.strip('"') for key, value in _table(hlo, "FunctionNames").items()}
    locations = {
        key: (int(re.search(r"file_name_id=(\d+)", value)[1]), int(re.search(r"function_name_id=(\d+)", value)[1]))
        for key, value in _table(hlo, "FileLocations").items()
    }
    frames = {
        key: (int(re.search(r"file_location_id=(\d+)", value)[1]), int(re.search(r"parent_frame_id=(\d+)", value)[1]))
        for key, value in _table(hlo, "StackFrames").items()
    }

    def stack(frame: str | None) -> list[tuple[str, str]]:
        calls, frame_id = [], int(frame) if frame else 0
        while frame_id in frames:
            location, parent = frames[frame_id]
            file_id, function_id = locations[location]
            calls.append((files[file_id], functions[function_id]))
            frame_id = parent if parent != frame_id else 0
        return calls

    metadata = re.compile(r'metadata=\{op_name="([^"]*)"(?: [^}]*stack_frame_id=(\d+))?')
    bodies = dict(re.findall(r"^%([\w.\-]+) (.*?\n\})", hlo, re.M | re.S))  # each computation's, found once
    sources = {}
    for line in hlo.splitlines():  # every computation's: kernels run in loop bodies too
        kernel = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if not kernel:
            continue
        found = metadata.search(line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if not found and called:
            inner = re.findall(r"= \S+ ([\w-]+)\(.*?" + metadata.pattern, bodies.get(called[1], ""))
            inner.sort(key=lambda op: op[0] != "concatenate")
            found = (None, *inner[0][1:]) if inner else None
        if found:
            sources[kernel[1]] = (found[1], stack(found[2]))
    return sources


def category(kernel: str, sources: dict) -> str:
    """What a kernel does, from its op name and the innermost jaxnets (or optax) function on its stack."""
    op, calls = sources.get(kernel, ("", []))
    ours = [function for file, function in calls if f"{os.sep}jaxnets{os.sep}" in file or "optax" in file]
    function = ours[0] if ours else ""
    if any("optax" in file for file, _ in calls):
        return "Adam update"
    if op.endswith("dot_general") or kernel.split(".")[0] in ("dot", "ynn_fusion"):
        return "matrix products"
    if function.startswith("patches") or (function == "conv2d" and op.endswith(("concatenate", "pad"))):
        return "im2col: the columns and their zero padding"
    if function == "_conv_dot" and op.endswith(("broadcast_in_dim", "dynamic_update_slice")):
        return "batch slices (no gradient): output zeroed, slices copied in"
    if op.endswith("optimization_barrier"):
        return "output gradient transposed for the kernel gradients"
    if function in BATCHNORM_AND_RELU:
        return "BatchNorm and ReLU (col2im fused into their backward)"
    if "pool" in function:
        return "pooling"
    if op.endswith("convert_element_type") or (not op and kernel.startswith("convert")):
        return "dtype conversions"
    if kernel.startswith("copy"):
        return "copies XLA inserts"
    return f"other ({function or kernel.rsplit('.', 1)[0]})"


def kernel_runs(planes) -> Iterator[tuple[str, int]]:
    """(kernel, nanoseconds) of each kernel run on the host's XLA threads in a trace's planes: not the executor's
    events, nor the loops' and calls' spans, which hold their bodies' kernels."""
    for plane in planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = event.name
                if name.startswith(NOT_KERNELS + ("$",)) or " " in name or name.split(".", 1)[0] in CONTAINERS:
                    continue
                yield name, event.duration_ns


def op_times(trace: str, sources: dict, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """Milliseconds per step and kernels per step, by category, from a trace folder of `steps` steps."""
    from jax._src.profiler import ProfileData

    milliseconds, counts, kinds = collections.Counter(), collections.Counter(), {}
    for kernel, nanoseconds in kernel_runs(ProfileData.from_file(xplane_file(trace)).planes):
        if kernel not in kinds:  # once per kernel, not per run of it
            kinds[kernel] = category(kernel, sources)
        milliseconds[kinds[kernel]] += nanoseconds / 1e6 / steps
        counts[kinds[kernel]] += 1 / steps
    return milliseconds, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="steps traced")
    args = parser.parse_args()

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = Inception3(6, in_channels=args.channels, dtype=dtype, rngs=nnx.Rngs(0))
    state = training.TrainState.create(model, optax.adam(1e-3))
    batch = random_batch(args.batch, args.size, args.channels)
    make_step = training.make_train_step if args.mode == "train" else training.make_eval_step
    with host_memory.collector_paused():  # as train.py traces its step
        compiled = make_step(losses.mse).lower(state, batch).compile()
    host_memory.release_freed_memory()
    sources = kernel_sources(compiled.as_text())

    def step(state):  # the train step returns the next state; the eval step leaves it as it is
        if args.mode == "train":
            return compiled(state, batch)
        return state, compiled(state, batch)

    for _ in range(3):  # warm-up
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            for _ in range(args.steps):
                state, metrics = step(state)
            jax.block_until_ready(metrics)
        milliseconds, counts = op_times(trace, sources, args.steps)
    total = sum(milliseconds.values())
    for kind, value in milliseconds.most_common():
        print(f"{kind:60s} {value:8.1f} ms {100 * value / total:5.1f} %  {counts[kind]:5.0f} kernels")
    print(f"{'all ops':60s} {total:8.1f} ms")
    print(json.dumps({"args": vars(args), "ms_per_step": {k: round(v, 1) for k, v in milliseconds.most_common()}}))


if __name__ == "__main__":
    main()
