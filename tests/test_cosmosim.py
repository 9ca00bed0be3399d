"""Tests for jaxnets.data.cosmosim: CSV+image round trip, caching, seeded splits and bad-input errors.

Each test writes a tiny CosmoSim-style CSV with its images into pytest's tmp_path.
"""

import csv
import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import COSMOSIM_TOML
from jaxnets.data import cosmosim, load_dataset

HEADER = ["index", "filename", "source", "lens", "chi", "x", "y", "einsteinR", "sigma", "sigma2", "theta", "nterms"]
HEIGHT, WIDTH = 10, 12


def write_dataset(folder, num_rows=10, seed=0, name="train.csv", image_folder="images"):
    """A CSV with random parameters and random grayscale PNGs (one RGB, one BMP); returns (csv, values, images)."""
    rng = np.random.default_rng(seed)
    (folder / image_folder).mkdir(parents=True, exist_ok=True)
    rows, values, images = [], {}, {}
    for i in range(num_rows):
        suffix = ".bmp" if i == 1 else ".png"
        filename = f"{image_folder}/image-{seed}-{i}{suffix}"
        if i == 0:  # an RGB file: stored as Pillow's 'L' conversion
            pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / filename)
            images[filename] = np.asarray(Image.fromarray(pixels, "RGB").convert("L"))
        else:
            pixels = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(folder / filename)
            images[filename] = pixels
        params = rng.normal(size=6).round(4)
        values[filename] = params
        rows.append([i, filename, "sersic", "SIS", 0.1, *params, 8])
    path = folder / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path, values, images


def stored_examples(dataset):
    """Every stored example by filename: split, image [H, W], target."""
    found = {}
    for split, examples in dataset.splits.items():
        for i in range(len(examples)):
            raw = examples.source[i]
            example = examples[i]
            found[raw["filename"].decode() if isinstance(raw["filename"], bytes) else raw["filename"]] = (
                split,
                example["image"][:, :, 0],
                example["target"],
                int(raw["row"]),
            )
    return found


def test_round_trip_values_images_and_recorded_split(tmp_path):
    csv_path, values, images = write_dataset(tmp_path, num_rows=10)
    dataset = load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"), seed=3)
    assert dataset.name == "csv:train" and dataset.task == "regression"
    assert dataset.target_names == ("x", "y", "einsteinR", "sigma", "sigma2", "theta")
    assert dataset.image_shape == (HEIGHT, WIDTH, 1)
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 8, "validation": 1, "test": 1}
    found = stored_examples(dataset)
    assert sorted(found) == sorted(values)  # every row exactly once
    for filename, (split, image, target, row) in found.items():
        np.testing.assert_array_equal(image, images[filename])
        np.testing.assert_array_equal(target, values[filename].astype(np.float32))
        assert row in dataset.metadata["split_rows"][split]
    # The split is the documented seeded permutation, and it is recorded.
    assert dataset.metadata["split_rows"] == {k: v.tolist() for k, v in cosmosim.split_rows(10, 0.1, 0.1, 3).items()}
    assert dataset.metadata["seed"] == 3


def test_a_clusters_lenses_are_columns_numbered_by_decreasing_einstein_radius(tmp_path):
    (tmp_path / "images").mkdir()
    clusters = [
        "SIE/1.5/-2/20/0.5/170;SIE/3/4/40.5/0.25/30",  # listed smallest first: lens 1 is the second
        "SIE/-1/2/60/0.75/90;SIE/0/0/10/0.8/10",
        "SIE/5/5/30/0.1/45;SIE/-5/-5/35/0.9/135",
        "SIE/2/2/12/0.3/0;SIE/-2/-2/11/0.6/60",
    ]
    with open(tmp_path / "params.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "filename", "model", "cluster", "source", "sigma"])
        for i, cluster in enumerate(clusters):
            Image.fromarray(np.full((4, 4), i, np.uint8), "L").save(tmp_path / "images" / f"image-{i}.png")
            writer.writerow([i + 1, f"image-{i}.png", "Raytrace", cluster, "SersicSphere", 1.0 + i])
    options = dict(data=str(tmp_path / "params.csv"), data_dir=str(tmp_path / "tfds"), validation_fraction=0.25)
    assert load_dataset(**options, test_fraction=0.0).target_names == ("sigma",)  # not default targets
    dataset = load_dataset(
        **options, test_fraction=0.0, targets=["einsteinradius[*]", "orientation[*]", "ellipseratio[2]"]
    )
    assert dataset.target_names == (
        "einsteinradius[1]", "einsteinradius[2]", "orientation[1]", "orientation[2]", "ellipseratio[2]"
    )  # fmt: skip
    assert dataset.angles == {"orientation[1]": 180.0, "orientation[2]": 180.0}  # as orientation is
    expected = {
        "image-0.png": [40.5, 20, 30, 170, 0.5],
        "image-1.png": [60, 10, 90, 10, 0.8],
        "image-2.png": [35, 30, 135, 45, 0.1],
        "image-3.png": [12, 11, 0, 60, 0.6],
    }
    for filename, (_, _, target, _) in stored_examples(dataset).items():
        np.testing.assert_allclose(target, expected[filename], rtol=1e-6)
    # An SIS lens has no ellipse; a field that is not a number is named with its line.
    with open(tmp_path / "params.csv", "a") as f:
        f.write("5,image-3.png,Raytrace,SIS/0/0/5;SIE/1/1/x/0.5/10,SersicSphere,2.0\n")
    with pytest.raises(ValueError, match=r"line 6: column 'einsteinradius\[2\]' is not a finite number: 'x'"):
        load_dataset(**options, test_fraction=0.0, targets=["einsteinradius[*]"])
    with pytest.raises(ValueError, match=r"line 6: column 'ellipseratio\[1\]' is empty"):
        load_dataset(**options, test_fraction=0.0, targets=["ellipseratio[1]"])
    # Joined to a file with a row the cluster file lacks: that is the message, whichever file comes first.
    write_rows(tmp_path / "extra.csv", [{"filename": f"image-{i}.png", "flux": i} for i in range(5)])
    with pytest.raises(ValueError, match=r"1 filename\(s\) of extra.csv are not in params.csv, e.g. image-4.png"):
        load_dataset(
            data=[str(tmp_path / "extra.csv"), str(tmp_path / "params.csv")],
            data_dir=str(tmp_path / "tfds"),
            targets=["flux", "einsteinradius[1]"],
        )


def test_targets_by_name_default_numeric_columns_and_image_dir(tmp_path):
    csv_path, values, _ = write_dataset(tmp_path, num_rows=6, image_folder="pictures")
    # Move the images elsewhere and blank the sigma2 column: default targets skip it.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pictures").rename(tmp_path / "elsewhere" / "pictures")
    text = csv_path.read_text().splitlines()
    rows = [r.split(",") for r in text]
    for r in rows[1:]:
        r[HEADER.index("sigma2")] = ""
    csv_path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match="not default targets, as some cells are empty: sigma2"):
        dataset = load_dataset(
            data=str(csv_path),
            image_dir=str(tmp_path / "elsewhere"),
            data_dir=str(tmp_path / "tfds"),
            validation_fraction=0.2,
            test_fraction=0.0,
        )
    assert dataset.target_names == ("x", "y", "einsteinR", "sigma", "theta")
    assert set(dataset.splits) == {"train", "validation"}
    chosen = load_dataset(
        data=str(csv_path),
        image_dir=str(tmp_path / "elsewhere"),
        targets=["einsteinR", "x"],
        data_dir=str(tmp_path / "tfds"),
    )
    assert chosen.target_names == ("einsteinR", "x")
    for filename, (_, _, target, _) in stored_examples(chosen).items():
        np.testing.assert_array_equal(target, values[filename][[2, 0]].astype(np.float32))


def test_separate_test_csv_forms_the_test_split(tmp_path):
    csv_path, _, _ = write_dataset(tmp_path, num_rows=8)
    test_path, test_values, _ = write_dataset(tmp_path, num_rows=3, seed=1, name="test.csv")
    dataset = load_dataset(data=str(csv_path), test_data=str(test_path), data_dir=str(tmp_path / "tfds"))
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 7, "validation": 1, "test": 3}
    test_files = {f for f, (split, *_) in stored_examples(dataset).items() if split == "test"}
    assert test_files == set(test_values)


def test_a_conversion_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
    temporary = tmp_path / "tmp"  # see test_lens: TFDS's GCS lookup of an unbuilt dataset
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    csv_path, _, _ = write_dataset(tmp_path, num_rows=4)
    load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert list(temporary.iterdir()) == []


def test_second_load_uses_the_cache_and_a_changed_csv_converts_again(tmp_path):
    csv_path, values, _ = write_dataset(tmp_path, num_rows=6)
    first = load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    missing = sorted(values)[2]
    (tmp_path / missing).unlink()  # the cache needs no image file
    second = load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert second.directory == first.directory and len(second.splits["train"]) == len(first.splits["train"])
    with open(csv_path, "a") as f:  # new content: a new key, checked and converted again
        f.write("\n")
    with pytest.raises(ValueError, match=f"image file not found: .*{missing}"):
        load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="1 problem"):
        load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"), seed=5)  # other options: other key


def test_bad_input_lists_every_problem_and_writes_nothing(tmp_path):
    csv_path, values, _ = write_dataset(tmp_path, num_rows=8)
    files = sorted(values)
    (tmp_path / files[2]).unlink()  # missing image file
    (tmp_path / files[3]).write_bytes(b"not an image at all")  # unreadable image
    Image.fromarray(np.zeros((HEIGHT + 1, WIDTH), np.uint8)).save(tmp_path / files[4])  # different size
    lines = csv_path.read_text().splitlines()
    cells = lines[6].split(",")
    cells[HEADER.index("einsteinR")] = "big"  # non-numeric target cell
    lines[6] = ",".join(cells)
    csv_path.write_text("\n".join(lines) + "\n")
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError) as error:
        load_dataset(data=str(csv_path), data_dir=str(data_dir))
    message = str(error.value)
    assert "4 problem(s)" in message and "nothing was written" in message
    assert f"image file not found: {tmp_path / files[2]}" in message
    assert f"unreadable image {tmp_path / files[3]}" in message
    assert f"{files[4]} is 11x12 (height x width); the others are 10x12" in message
    assert "train.csv line 7: column 'einsteinR' is not a finite number: 'big'" in message
    assert not data_dir.exists() or not list(data_dir.rglob("*.array_record*"))

    with pytest.raises(ValueError, match="target column 'chi2' missing"):
        load_dataset(data=str(csv_path), targets=("x", "chi2"), data_dir=str(data_dir))
    with pytest.raises(ValueError, match="CSV file not found"):
        load_dataset(data=str(tmp_path / "nope.csv"), data_dir=str(data_dir))


def test_problem_list_is_capped(tmp_path):
    csv_path, values, _ = write_dataset(tmp_path, num_rows=30)
    for filename in values:
        (tmp_path / filename).unlink()
    with pytest.raises(ValueError, match=r"30 problem\(s\)[\s\S]*and 10 more"):
        load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))


def test_failure_during_conversion_leaves_no_dataset(tmp_path, monkeypatch):
    csv_path, _, _ = write_dataset(tmp_path, num_rows=6)
    real_load = cosmosim.load_image
    calls = []

    def failing_load(path, size=None):
        calls.append(path)
        if len(calls) == 6 + 3:  # all 6 checks pass, then the 3rd image written fails
            raise OSError("disk gone")
        return real_load(path, size)

    monkeypatch.setattr(cosmosim, "load_image", failing_load)
    with pytest.raises(OSError, match="disk gone"):
        load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
    assert not list((tmp_path / "tfds").rglob("incomplete*"))
    monkeypatch.setattr(cosmosim, "load_image", real_load)
    dataset = load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert sum(len(s) for s in dataset.splits.values()) == 6


# ---------------------------------------------------------------------------------------------
# Real CosmoSim 3.3 output: a small seeded set generated by the simulator itself.

GENERATE = """
import random, runpy, sys
import numpy as np
random.seed(1); np.random.seed(1)  # CosmoSim has no seed option; it draws from these two generators
sys.argv = ["CosmoSim", "--toml", "dataset.toml", "--rnd", "--csvfile", "params.csv", "--outfile", "roulette.csv",
            "--directory", "images", "--imagesize", "96", "--cropsize", "64", "--nterms", "3"]
runpy.run_module("CosmoSim", run_name="__main__")
"""


@pytest.fixture(scope="module")
def cosmosim_output(tmp_path_factory):
    """CosmoSim's own files: params.csv, roulette.csv and images/image-NNNNNN.png (64 px), 120 rows."""
    pytest.importorskip("CosmoSim")
    folder = tmp_path_factory.mktemp("cosmosim")
    (folder / "dataset.toml").write_text(COSMOSIM_TOML.format(size=120, imagesize=96, cropsize=64))
    result = subprocess.run([sys.executable, "-c", GENERATE], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def raw_targets(dataset):
    """{filename: stored target vector} over every split."""
    return {name: target for name, (_, _, target, _) in stored_examples(dataset).items()}


def test_parameter_file_as_it_comes(cosmosim_output, tmp_path):
    dataset = load_dataset(data=str(cosmosim_output / "params.csv"), data_dir=str(tmp_path))
    # Every numeric lens and source parameter, in the file's order; images found in images/ by themselves.
    assert dataset.target_names == (
        "einsteinradius", "ellipseratio", "orientation", "R", "phi", "sigma", "sigma2", "theta", "n_sersic",
        "luminosity", "x", "y",
    )  # fmt: skip
    assert dataset.angles == {"orientation": 180.0, "phi": 360.0, "theta": 180.0}
    assert dataset.image_shape == (64, 64, 1)
    rows = {row["filename"]: row for row in read_rows(cosmosim_output / "params.csv")}
    for filename, target in raw_targets(dataset).items():
        expected = [float(rows[filename][name]) for name in dataset.target_names]
        np.testing.assert_allclose(target, expected, rtol=1e-6)
        image = np.asarray(Image.open(cosmosim_output / "images" / filename))
        assert image.shape == (64, 64)


def test_roulette_file_with_patterns_drops_constant_columns_with_one_warning(cosmosim_output, tmp_path):
    with pytest.warns(
        UserWarning,
        match=r"dropped 2 target\(s\) constant on the training split: beta\[1\]\[0\], "
        r"beta\[3\]\[0\]",
    ):
        dataset = load_dataset(
            data=str(cosmosim_output / "roulette.csv"),
            targets=("sigma", "xiX", "xiY", "alpha[*][*]", "beta[*][*]"),
            data_dir=str(tmp_path),
        )
    header = read_rows(cosmosim_output / "roulette.csv")[0].keys()
    amplitudes = [c for c in header if c.startswith(("alpha[", "beta[")) and c not in ("beta[1][0]", "beta[3][0]")]
    assert dataset.target_names == ("sigma", "xiX", "xiY", *amplitudes)
    assert "alpha[1][0]" in dataset.target_names and not dataset.angles


def test_both_files_joined_on_filename_with_aliases(cosmosim_output, tmp_path):
    params, roulette = cosmosim_output / "params.csv", cosmosim_output / "roulette.csv"
    dataset = load_dataset(
        data=(str(params), str(roulette)), targets=("einsteinR", "ratio", "theta", "xiX", "alpha[1][0]"),
        data_dir=str(tmp_path),
    )  # fmt: skip
    assert dataset.target_names == ("einsteinradius", "ellipseratio", "theta", "xiX", "alpha[1][0]")
    by_name = {row["filename"]: row for row in read_rows(params)}
    by_name_roulette = {row["filename"]: row for row in read_rows(roulette)}
    for filename, target in raw_targets(dataset).items():
        expected = [float(by_name[filename][c]) for c in ("einsteinradius", "ellipseratio", "theta")]
        expected += [float(by_name_roulette[filename][c]) for c in ("xiX", "alpha[1][0]")]
        np.testing.assert_allclose(target, np.float32(expected), rtol=1e-6)


def test_files_that_describe_different_images_are_refused(cosmosim_output, tmp_path):
    rows = read_rows(cosmosim_output / "roulette.csv")
    write_rows(tmp_path / "roulette.csv", rows[3:])  # three images missing from the roulette file
    with pytest.raises(
        ValueError,
        match=r"3 filename\(s\) of params.csv are not in roulette.csv, e.g. "
        r"image-000001.png, image-000002.png, image-000003.png",
    ):
        load_dataset(
            data=(str(cosmosim_output / "params.csv"), str(tmp_path / "roulette.csv")),
            image_dir=str(cosmosim_output / "images"), data_dir=str(tmp_path / "tfds"),
        )  # fmt: skip


def test_empty_target_cells_are_named_or_dropped(cosmosim_output, tmp_path):
    rows = read_rows(cosmosim_output / "params.csv")
    for row in rows[:5]:
        row["ellipseratio"] = ""  # CosmoSim leaves a parameter that does not apply empty (an SIS lens's ratio)
    rows[7]["sigma"] = "n/a"
    write_rows(tmp_path / "params.csv", rows)
    options = dict(image_dir=str(cosmosim_output / "images"), data_dir=str(tmp_path / "tfds"))
    # Default targets leave the column with empty cells out (a note says so) but refuse the garbled cell.
    with pytest.raises(ValueError, match=r"params.csv line 9: column 'sigma' is not a finite number: 'n/a'"):
        load_dataset(data=str(tmp_path / "params.csv"), **options)
    with pytest.raises(ValueError) as error:
        load_dataset(data=str(tmp_path / "params.csv"), targets=("ellipseratio", "sigma"), **options)
    assert "6 problem(s)" in str(error.value)
    for line in (2, 3, 4, 5, 6):
        assert f"params.csv line {line}: column 'ellipseratio' is empty" in str(error.value)
    with pytest.warns(UserWarning, match=r"dropped 6 row\(s\) with an empty or non-numeric target cell"):
        dataset = load_dataset(
            data=str(tmp_path / "params.csv"), targets=("ellipseratio", "sigma"), drop_incomplete=True, **options
        )
    assert sum(len(split) for split in dataset.splits.values()) == 114


def test_a_named_constant_target_is_refused(cosmosim_output, tmp_path):
    with pytest.raises(ValueError, match=r"target 'lensX' is constant \(0\) on the training split"):
        load_dataset(data=str(cosmosim_output / "roulette.csv"), targets=("xiX", "lensX"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"target pattern 'gamma\[\*\]' matches no column"):
        load_dataset(data=str(cosmosim_output / "roulette.csv"), targets=("gamma[*]",), data_dir=str(tmp_path))


def test_pre_split_files_and_resizing(cosmosim_output, tmp_path):
    rows = read_rows(cosmosim_output / "params.csv")
    for name, part in (("training", rows[:80]), ("validation", rows[80:100]), ("testing", rows[100:])):
        write_rows(tmp_path / f"{name}.csv", part)
    dataset = load_dataset(
        data=str(tmp_path / "training.csv"),
        validation_data=str(tmp_path / "validation.csv"),
        test_data=str(tmp_path / "testing.csv"),
        image_dir=str(cosmosim_output / "images"),
        image_size=32,
        data_dir=str(tmp_path / "tfds"),
    )
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 80, "validation": 20, "test": 20}
    assert dataset.image_shape == (32, 32, 1)
    found = stored_examples(dataset)
    assert {f for f, (split, *_) in found.items() if split == "test"} == {r["filename"] for r in rows[100:]}
    filename, (_, image, _, _) = next(iter(found.items()))
    with Image.open(cosmosim_output / "images" / filename) as original:
        expected = np.asarray(original.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(image, expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "files, targets",
    [
        (("params.csv",), "einsteinR,sigma,theta,orientation"),
        (("roulette.csv",), "sigma,theta,xiX,alpha[1][0]"),
        (("params.csv", "roulette.csv"), "sigma,theta,xiX,alpha[*][*]"),
    ],
)
def test_train_and_evaluate_each_file_kind_through_the_cli(cosmosim_output, tmp_path, files, targets, capsys):
    from conftest import cli_args, run_in_process

    data = ",".join(str(cosmosim_output / name) for name in files)
    args = cli_args(model="mlp", hidden=(16,), batch_size=16, epochs=1, compilation_cache="")
    args += ["--data", data, "--targets", targets, "--workdir", tmp_path / "run", "--data-dir", tmp_path / "tfds"]
    trained = run_in_process(capsys, "train.py", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Epoch 1: Loss = " in trained.stdout
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", tmp_path / "run")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "theta*" in evaluated.stdout and "* angle, errors the shorter way round the circle: theta (period 180)" \
        in evaluated.stdout  # fmt: skip
    rows = read_rows(tmp_path / "run" / "predictions_test.csv")
    assert "theta (true)" in rows[0] and "sigma (predicted)" in rows[0]
    if "roulette.csv" in files:
        assert "alpha[1][0] (predicted)" in rows[0]  # bracketed names as CosmoSim writes them
    if files != ("params.csv", "roulette.csv"):
        return
    # The CSV holds the angle itself, in CosmoSim's degrees; the true column equals the parameter file's value.
    predicted = np.array([float(r["theta (predicted)"]) for r in rows])
    assert ((predicted >= 0) & (predicted < 180)).all()
    report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert report["parameters"]["theta"]["period"] == 180.0
    (metadata,) = (tmp_path / "tfds").rglob("metadata.json")
    test_rows = json.loads(metadata.read_text())["split_rows"]["test"]  # test example i is this CSV data row
    params = read_rows(cosmosim_output / "params.csv")
    for r in rows:
        row = params[test_rows[int(r["index"])]]
        assert float(r["theta (true)"]) == float(row["theta"])  # exact: not decoded back
        assert r["filename"] == row["filename"]  # the image behind the prediction
    assert (cosmosim_output / "images" / rows[0]["filename"]).is_file()

    bad = cosmosim_output.parent / "bad.csv"
    write_rows(
        bad, [dict(r, sigma="oops") if i == 3 else r for i, r in enumerate(read_rows(cosmosim_output / "params.csv"))]
    )
    refused = run_in_process(capsys, "train.py", "--data", bad, "--image-dir", cosmosim_output / "images",
                             "--workdir", tmp_path / "bad", "--data-dir", tmp_path / "tfds",
                             "--compilation-cache", "")  # fmt: skip
    assert refused.returncode == 2 and "bad.csv line 5: column 'sigma' is not a finite number: 'oops'" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_polar_amplitudes_train_turned_and_evaluate_over_eight_views(cosmosim_output, tmp_path, capsys):
    from conftest import cli_args, run_in_process
    from jaxnets import experiment
    from jaxnets.config import Config

    args = cli_args(model="mlp", hidden=(16,), batch_size=16, epochs=1, compilation_cache="")
    args += ["--data", cosmosim_output / "roulette.csv", "--targets", "sigma,xiX,xiY,alpha[*][*],beta[*][*]"]
    args += ["--amplitudes", "polar", "--augment", "--workdir", tmp_path / "run", "--data-dir", tmp_path / "tfds"]
    trained = run_in_process(capsys, "train.py", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    config = Config.load(str(tmp_path / "run"))
    assert config.amplitudes == "polar"
    dataset = experiment.load_data(config)
    pairs = [(a, b) for a, b in experiment.polar_amplitudes(config, dataset)]
    assert ("alpha[0][1]", "beta[0][1]") in pairs and ("alpha[1][0]", None) in pairs  # nterms 3: beta[1][0] is 0
    amplitudes = [name for name in dataset.target_names if name.startswith(("alpha", "beta"))]
    # Three outputs per pair, two per lone amplitude, one per other target.
    outputs = experiment.output_names(dataset, config)
    assert len(outputs) == 3 + sum(3 if b else 2 for _, b in pairs) and len(amplitudes) == sum(
        1 + bool(b) for _, b in pairs
    )
    evaluated = run_in_process(capsys, "evaluate.py", "--workdir", tmp_path / "run")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert report["views"] == 8 and set(amplitudes) <= set(report["parameters"])
    assert all(np.isfinite(report["parameters"][name]["r2"]) for name in amplitudes)
