"""bench/compare_torch.py: what a mistyped case gets."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
