"""bench/refit_head.py: the last layer refitted by least squares on a trained run's features."""

import importlib.util
import json
import os
import sys

import pytest
from test_experiment import write_roulette_csv

from conftest import TINY, cli_args, run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("refit_head", os.path.join(ROOT, "bench", "refit_head.py"))
refit_head = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refit_head)


@pytest.mark.slow
def test_a_trained_run_is_refitted_and_reported(tmp_path, capsys, monkeypatch):
    csv_file = write_roulette_csv(tmp_path / "csv", num_rows=60)
    workdir = tmp_path / "run"
    tiny = dict(TINY, num_train=None, num_validation=None, num_test=None, image_size=None, epochs=1)
    args = cli_args(**{k: v for k, v in tiny.items() if v is not None}, workdir=workdir, data_dir=tmp_path / "tfds")
    targets = "sigma,xiX,xiY,alpha[*][*],beta[*][*]"
    trained = run_in_process(capsys, "train.py", "--data", csv_file, "--targets", targets, *args, "--no-refit-head")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    out = tmp_path / "refit.json"
    monkeypatch.setattr(sys, "argv", ["refit_head.py", str(workdir), "--out", str(out)])
    refit_head.main()
    report = json.loads(out.read_text())
    as_trained = report["results"]["as trained"]["test"]["r2"]
    # Scored as evaluate.py scores the run (8 views averaged), before any refit.
    saved = json.loads((workdir / "eval_test.json").read_text())["parameters"]
    assert as_trained == pytest.approx({name: p["r2"] for name, p in saved.items()}, abs=1e-4)
    assert report["chosen"] in [f"ridge {ridge:g}" for ridge in refit_head.RIDGES]
    assert "(chosen on validation)" in capsys.readouterr().out
