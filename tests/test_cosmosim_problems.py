"""bench/cosmosim_problems.py: the means it reports beside the group's figures."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cosmosim_problems", os.path.join(ROOT, "bench", "cosmosim_problems.py"))
cosmosim_problems = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cosmosim_problems)

SIE = cosmosim_problems.PROBLEMS["sie"]


def report(r2: dict) -> dict:
    return {"parameters": {name: {"r2": value, "mae": 1.0} for name, value in r2.items()}}


def test_the_means_leave_out_what_the_image_cannot_show_and_the_auxiliary_targets():
    # sigma2 and theta (a round source) count in the uniform mean only; R (auxiliary) in none.
    r2 = {"sigma": 0.9, "sigma2": -0.1, "theta": 0.1, "xiX": 0.6, "xiY": 0.3, "alpha[1][0]": 0.5, "beta[2][1]": 0.1}
    r2["R"] = 0.99
    means = cosmosim_problems.summarize(report(r2), SIE)
    assert means == pytest.approx(
        {"uniform": (0.9 - 0.1 + 0.1 + 0.6 + 0.3 + 0.5 + 0.1) / 7, "identifiable": 0.6, "amplitudes": 0.3, "scored": 7}
    )
    table = cosmosim_problems.table("sie", SIE, {"test": report(r2), "validation": report(r2)})
    assert "| uniform, all 7 targets | 0.343 | 0.343 | 0.051 (epoch 12 of 12) |" in table
    assert "| R | 0.990 | 1 | 0.990 | auxiliary: trained alongside, out of the means |" in table
