"""Tests for jaxnets.data.cosmosim: CSV+image round trip, caching, seeded splits and bad-input errors.

Each test writes a tiny CosmoSim-style CSV with its images into pytest's tmp_path.
"""

import csv

import numpy as np
import pytest
from PIL import Image

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

    def failing_load(path):
        calls.append(path)
        if len(calls) == 6 + 3:  # all 6 checks pass, then the 3rd image written fails
            raise OSError("disk gone")
        return real_load(path)

    monkeypatch.setattr(cosmosim, "load_image", failing_load)
    with pytest.raises(OSError, match="disk gone"):
        load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
    assert not list((tmp_path / "tfds").rglob("incomplete*"))
    monkeypatch.setattr(cosmosim, "load_image", real_load)
    dataset = load_dataset(data=str(csv_path), data_dir=str(tmp_path / "tfds"))
    assert sum(len(s) for s in dataset.splits.values()) == 6
