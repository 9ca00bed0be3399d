"""bench/compare_torch.py: what a mistyped case gets, and the work a GPU case's MFU counts."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("compare_torch", os.path.join(ROOT, "bench", "compare_torch.py"))
compare_torch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_torch)


def test_an_unknown_case_is_named_with_the_cases_there_are():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "compare_torch.py"), "--cases", "train128,eval"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--cases eval: the CPU cases are train128, train299, eval299" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gpu_case_counts_three_forwards_to_train_and_scales_by_the_area():
    assert compare_torch.step_gflop("eval", 299) == pytest.approx(11.42)
    assert compare_torch.step_gflop("train", 299) == pytest.approx(3 * 11.42)
    assert compare_torch.step_gflop("train", 256) == pytest.approx(3 * 11.42 * 256**2 / 299**2)
    assert compare_torch.DEVICE_CASES["gpu-train256-b32"] == ("train", 32, 1, 256)  # the group's batch and size
    assert "gpu-train256-b32" not in compare_torch.DEFAULT_DEVICE_CASES.split(",")  # asked for by name only
