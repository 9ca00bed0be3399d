"""bench/cosmosim_problems.py: the means it reports beside the group's figures."""

import argparse
import importlib.util
import json
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


ARGS = argparse.Namespace(image_size=64, num_train=30, num_validation=5, num_test=10, epochs=2, data_dir=None)


def as_dict(listed: list[str]) -> dict[str, str | bool]:
    """train.py's options as {option: value}, True for a flag (an option followed by another option)."""
    options = {}
    for at, item in enumerate(listed):
        if item.startswith("--"):
            following = listed[at + 1] if at + 1 < len(listed) else "--"
            options[item] = True if following.startswith("--") else following
    return options


def train_options(problem: str, *extra: str, auxiliary: bool = True, **sizes) -> dict[str, str | bool]:
    args = argparse.Namespace(**{**vars(ARGS), **sizes}, auxiliary=auxiliary)
    return as_dict(cosmosim_problems.train_options(cosmosim_problems.PROBLEMS[problem], "runs/x", args, list(extra)))


def test_sie_trains_its_auxiliary_targets_with_sigma_weighed_unless_told_otherwise():
    default = train_options("sie")
    assert default["--simulate"] == os.path.join("bench", "problems", "sie.toml")
    assert default["--targets"] == (
        "sigma,sigma2,theta,xiX,xiY,alpha[*][*],beta[*][*],einsteinradius,ellipseratio,orientation,R,phi"
    )
    assert default["--target-weights"] == "sigma:2"
    assert train_options("sie", "--target-weights", "xiX:3")["--target-weights"] == "xiX:3"  # the user's alone
    listed = cosmosim_problems.train_options(
        SIE, "runs/x", argparse.Namespace(**vars(ARGS), auxiliary=True), ["--target-weights=xiX:3"]
    )
    assert listed[-1] == "--target-weights=xiX:3" and "sigma:2" not in listed  # written with =, the same
    plain = train_options("sie", auxiliary=False)
    assert plain["--targets"] == "sigma,sigma2,theta,xiX,xiY,alpha[*][*],beta[*][*]"
    assert "--target-weights" not in plain
    assert "--target-weights" not in train_options("cluster2")  # no auxiliary targets: nothing weighed


def test_each_problem_trains_with_its_cpu_setting_unless_the_sizes_are_given():
    sie, cluster2 = (train_options(name, num_train=None, epochs=None) for name in ("sie", "cluster2"))
    assert (sie["--num-train"], sie["--epochs"], sie.get("--augment")) == ("6000", "5", True)
    assert (cluster2["--num-train"], cluster2["--epochs"], cluster2.get("--augment")) == ("3000", "10", None)
    given = cosmosim_problems.train_options(
        SIE, "runs/x", argparse.Namespace(**vars(ARGS), auxiliary=True), ["--no-augment"]
    )
    assert as_dict(given)["--num-train"] == "30" and as_dict(given)["--epochs"] == "2"  # the user's sizes
    assert given[-2:] == ["--augment", "--no-augment"]  # the user's options after the problem's: theirs win


def test_a_time_budget_leaves_the_reserve_and_fits_whole_epochs():
    reserve = cosmosim_problems.RESERVE_SECONDS
    assert cosmosim_problems.epochs_within(reserve + 100, 16.0, 40) == 6  # 100 s hold six 16 s epochs
    assert cosmosim_problems.epochs_within(reserve + 10_000, 16.0, 40) == 40  # no more than asked
    assert cosmosim_problems.epochs_within(reserve - 50, 16.0, 40) == 1  # at least one


def test_a_time_budget_calibrates_on_one_epoch_then_trains_what_fits(tmp_path, monkeypatch, capsys):
    # train.py and evaluate.py stand-ins: each run takes `seconds`, writes what the real one writes.
    calls, seconds = [], {"train.py": 60.0, "evaluate.py": 5.0}

    def run(script, *options):
        listed = as_dict(list(options))
        calls.append((script, listed))
        workdir = listed["--workdir"]
        os.makedirs(workdir, exist_ok=True)
        if script == "train.py":
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                f.write('{"epoch": 1, "seconds": 20.0}\n')
        else:
            with open(os.path.join(workdir, f"eval_{listed['--split']}.json"), "w") as f:
                json.dump(report({"sigma": 0.5, "xiX": 0.5, "alpha[1][0]": 0.4}), f)
        return seconds[script]

    monkeypatch.setattr(cosmosim_problems, "run", run)
    budget = cosmosim_problems.RESERVE_SECONDS + 60 + 200  # the calibration's 60 s, then ten 20 s epochs
    out = str(tmp_path / "o.json")
    argv = ["cosmosim_problems.py", "--problems", "cluster2", "--runs", str(tmp_path), "--out", out]
    monkeypatch.setattr("sys.argv", [*argv, "--time-budget", str(budget)])
    cosmosim_problems.main()

    (_, calibration), (_, training) = calls[:2]
    assert calibration["--workdir"] == str(tmp_path / "cluster2-calibration") and calibration["--epochs"] == "1"
    assert training["--workdir"] == str(tmp_path / "cluster2") and training["--epochs"] == "10"
    assert calibration["--num-train"] == training["--num-train"] == "3000"  # the same images, simulated once
    assert [script for script, _ in calls[2:]] == ["evaluate.py"] * 4
    # The calibration only times an epoch: no refit of its last layer; the run is evaluated as trained, then refitted.
    assert calibration.get("--no-refit-head") is True and "--no-refit-head" not in training
    assert [("--no-refit" in listed, listed["--split"]) for _, listed in calls[2:]] == [
        (True, "validation"),
        (False, "validation"),
        (True, "test"),
        (False, "test"),
    ]
    assert "an epoch 20.0 s: 10 epochs fit" in capsys.readouterr().out
    with open(out) as f:
        assert json.load(f)["cluster2"]["seconds"]["calibration"] == 60.0
