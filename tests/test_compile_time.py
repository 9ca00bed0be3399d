"""bench/compile_time.py: reading XLA:CPU's compile timers."""
# ruff: noqa: E501  (XLA log lines, verbatim)

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))  # as when the script runs: its folder first
spec = importlib.util.spec_from_file_location("compile_time", os.path.join(ROOT, "bench", "compile_time.py"))
compile_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compile_time)

# Lines as XLA:CPU (jax 0.10.2) logs them at TF_CPP_VMODULE=cpu_compiler=1,ir_compiler=1; a program compiled
# before the train step comes first and is not counted.
LOG = """\
I1203 13:54:09.364300   21368 ir_compiler.cc:293] Compiled LLVM module: __compute_module_bitcast_concatenate_fusion_kernel_module time: 4.64 ms (4644 us) (cumulative: 4.64 ms, max: 4.64 ms, #called: 1)
I1203 13:55:00.355773   21402 cpu_compiler.cc:1269] Running HLO passes on [jit_train_step] for CPU time: 3.67 s (3666378 us) (cumulative: 3.86 s, max: 3.67 s, #called: 33)
I1203 13:55:00.357098   21402 cpu_compiler.cc:2091] Compiling: jit_train_step
I1203 13:55:07.225370   21405 ir_compiler.cc:293] Compiled LLVM module: __compute_module_pad_slice_fusion.192_kernel_module time: 28.4 ms (28354 us) (cumulative: 3.28 s, max: 117 ms, #called: 223)
I1203 13:55:08.016581   21406 ir_compiler.cc:293] Compiled LLVM module: __compute_module_pad_slice_fusion_kernel_module time: 93.4 ms (93441 us) (cumulative: 4.81 s, max: 117 ms, #called: 285)
I1203 13:55:08.569190   21405 ir_compiler.cc:293] Compiled LLVM module: __compute_module_multiply_add_fusion.7_kernel_module time: 1.2 s (1200000 us) (cumulative: 5.9 s, max: 1.2 s, #called: 318)
I1203 13:55:19.369881   21402 cpu_compiler.cc:2154] Compilation finished
I1203 13:55:19.373235   21402 cpu_compiler.cc:2094] Compiling [jit_train_step] for CPU using JIT time: 19 s (19015582 us) (cumulative: 22.2 s, max: 19 s, #called: 33)
"""


def test_the_train_steps_compile_is_summed_by_kernel_kind():
    result = compile_time.anatomy(LOG)
    assert result["hlo_passes_s"] == 3.67
    assert result["codegen_s"] == 19.02
    assert result["kernels"] == 3
    assert result["kernel_llvm_s_summed"] == pytest.approx(0.028354 + 0.093441 + 1.2, abs=0.01)
    assert list(result["largest_kinds"]) == ["multiply_add_fusion", "pad_slice_fusion"]
    assert result["largest_kinds"]["pad_slice_fusion"] == {"kernels": 2, "llvm_s": 0.12}


def test_a_log_without_the_timers_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no timer lines for jit_train_step"):
        compile_time.anatomy("I1203 cpu_compiler.cc:2091] Compiling: jit_train_step\n")


def test_the_slowest_kernels_are_named_with_the_shape_they_write():
    hlo = """\
  %pad_slice_fusion = f32[5408,864]{1,0} fusion(%p.1), kind=kLoop, calls=%fused_computation.3
  %multiply_add_fusion.7 = f32[192]{0} fusion(%p.2, %p.3), kind=kLoop, calls=%fused_computation.9
  ROOT %pad_slice_fusion.192 = bf16[1152,720]{1,0} fusion(%p.4), kind=kLoop, calls=%fused_computation.4
"""
    assert compile_time.slowest(LOG, hlo, 2) == [
        {"kernel": "multiply_add_fusion.7", "llvm_ms": 1200, "writes": "f32[192]"},
        {"kernel": "pad_slice_fusion", "llvm_ms": 93, "writes": "f32[5408,864]"},
    ]
    assert [row["writes"] for row in compile_time.slowest(LOG, hlo, 5)] == [
        "f32[192]",
        "f32[5408,864]",
        "bf16[1152,720]",
    ]
