"""Tests for jaxnets.data.pipeline and named TFDS datasets: shapes, masks, reshuffles, shards, no lost example.

Most tests use an in-memory dataset; named datasets use tfds.testing.mock_data (no download).
"""

import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxnets.data import Dataset, Examples, load_dataset, split_off
from jaxnets.data.pipeline import PIXEL_SCALES, batches, destandardize, num_batches

NUM_EXAMPLES = 23


def toy_dataset(num_train=NUM_EXAMPLES, num_validation=10, classification=False):
    """Image pixels encode the example number, so every batch row can be traced to its source."""
    rng = np.random.default_rng(0)

    def split(count, offset):
        examples = []
        for i in range(count):
            example = {"image": np.full((4, 3, 1), (offset + i) % 256, np.uint8)}
            if classification:
                example["label"] = np.int64(i % 3)
            else:
                example["target"] = (np.array([10.0, -2.0]) + np.array([3.0, 0.5]) * rng.normal(size=2)).astype(
                    np.float32
                )
            examples.append(example)
        key = {"label_key": "label"} if classification else {"target_key": "target"}
        return Examples(examples, **key)

    splits = {"train": split(num_train, 0), "validation": split(num_validation, 100), "test": split(0, 200)}
    if classification:
        return Dataset("toy", "classification", splits, (4, 3, 1), ("a", "b", "c"), 3)
    return Dataset("toy", "regression", splits, (4, 3, 1), ("p", "q"))


def test_evaluation_pads_the_last_batch_and_loses_nothing():
    dataset = toy_dataset()
    out = list(batches(dataset, "train", 5, train=False))
    assert len(out) == num_batches(dataset, "train", 5, train=False) == 5
    for batch in out:
        assert batch["image"].shape == (5, 4, 3, 1) and batch["image"].dtype == np.float32
        assert batch["target"].shape == (5, 2) and batch["target"].dtype == np.float32
        assert batch["mask"].dtype == np.float32 and batch["index"].dtype == np.int32
    index = np.concatenate([b["index"] for b in out])
    mask = np.concatenate([b["mask"] for b in out])
    np.testing.assert_array_equal(index, list(range(NUM_EXAMPLES)) + [-1, -1])  # in order, then padding
    np.testing.assert_array_equal(mask, [1.0] * NUM_EXAMPLES + [0.0, 0.0])
    last = out[-1]
    np.testing.assert_array_equal(last["image"][3:], 0.0)
    np.testing.assert_array_equal(last["target"][3:], 0.0)
    for batch in out:  # images are the source pixels scaled to [0, 1]
        for row in np.flatnonzero(batch["mask"]):
            np.testing.assert_allclose(batch["image"][row], batch["index"][row] / 255, rtol=1e-6)
            np.testing.assert_array_equal(batch["target"][row], dataset.splits["train"][batch["index"][row]]["target"])


def test_training_shuffles_per_epoch_drops_remainder_and_resumes_exactly():
    dataset = toy_dataset()
    epoch0 = [b["index"] for b in batches(dataset, "train", 5, train=True, seed=1, epoch=0)]
    assert len(epoch0) == num_batches(dataset, "train", 5, train=True) == 4  # 23 // 5, remainder dropped
    seen = np.concatenate(epoch0)
    assert len(set(seen.tolist())) == 20 and seen.min() >= 0 and seen.max() < NUM_EXAMPLES
    assert not np.array_equal(seen, np.arange(20))  # shuffled
    again = [b["index"] for b in batches(dataset, "train", 5, train=True, seed=1, epoch=0)]
    np.testing.assert_array_equal(np.concatenate(again), seen)  # same (seed, epoch): same order
    epoch1 = np.concatenate([b["index"] for b in batches(dataset, "train", 5, train=True, seed=1, epoch=1)])
    other_seed = np.concatenate([b["index"] for b in batches(dataset, "train", 5, train=True, seed=2, epoch=0)])
    assert not np.array_equal(epoch1, seen) and not np.array_equal(other_seed, seen)
    resumed = [b["index"] for b in batches(dataset, "train", 5, train=True, seed=1, epoch=0, start_batch=3)]
    assert len(resumed) == 1 and np.array_equal(resumed[0], epoch0[3])
    assert list(batches(dataset, "train", 5, train=True, seed=1, start_batch=4)) == []
    for batch in batches(dataset, "train", 5, train=True):
        np.testing.assert_array_equal(batch["mask"], 1.0)


def test_each_process_reads_its_rows_of_every_global_batch():
    dataset = toy_dataset()
    for train in (True, False):
        whole = list(batches(dataset, "train", 6, train=train, seed=4, epoch=2))
        shards = [
            list(batches(dataset, "train", 6, train=train, seed=4, epoch=2, process_index=p, process_count=3))
            for p in range(3)
        ]
        assert all(len(s) == len(whole) for s in shards)
        for k, batch in enumerate(whole):
            for key in batch:
                assert shards[0][k][key].shape[0] == 2
                np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shards]), batch[key])
        resumed = list(
            batches(dataset, "train", 6, train=train, seed=4, epoch=2, start_batch=1, process_index=2, process_count=3)
        )
        np.testing.assert_array_equal(resumed[0]["index"], shards[2][1]["index"])


def test_standardize_and_destandardize_round_trip():
    dataset = toy_dataset()
    targets = np.stack([dataset.splits["train"][i]["target"] for i in range(NUM_EXAMPLES)]).astype(np.float64)
    mean, std = dataset.target_stats()
    assert mean.dtype == np.float32 and mean.shape == (2,)
    np.testing.assert_allclose(mean, targets.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, targets.std(0), rtol=1e-6)
    out = list(batches(dataset, "train", 8, train=False, standardize=(mean, std)))
    standardized = np.concatenate([b["target"] for b in out])[:NUM_EXAMPLES]
    np.testing.assert_allclose(standardized.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(destandardize(standardized, (mean, std)), targets, rtol=1e-5)
    np.testing.assert_array_equal(out[-1]["target"][NUM_EXAMPLES % 8 :], 0.0)  # padding stays 0


def test_classification_batches_have_int32_labels():
    dataset = toy_dataset(classification=True)
    batch = next(batches(dataset, "train", 4, train=True))
    assert set(batch) == {"image", "label", "mask", "index"} and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], batch["index"] % 3)
    with pytest.raises(ValueError, match="target_stats\\(\\) is for regression"):
        dataset.target_stats()


def test_pixel_scales_linear_and_log():
    """The toy images hold their example number: linear is v / 255 as the float32 product it always was; log is
    log(1 + v) / log(256): 3 -> 1/4, 15 -> 1/2, 255 -> 1."""
    dataset = toy_dataset()
    pixel = np.arange(NUM_EXAMPLES)
    (linear,) = batches(dataset, "train", NUM_EXAMPLES, train=False)
    np.testing.assert_array_equal(linear["image"][:, 0, 0, 0], pixel.astype(np.float32) * np.float32(1 / 255))
    (log,) = batches(dataset, "train", NUM_EXAMPLES, train=False, pixel_scale="log")
    np.testing.assert_allclose(log["image"][:, 0, 0, 0], np.log1p(pixel) / np.log(256), rtol=1e-6)
    assert log["image"][3, 0, 0, 0] == pytest.approx(0.25) and log["image"][15, 0, 0, 0] == pytest.approx(0.5)
    assert log["image"].dtype == np.float32 and PIXEL_SCALES["log"][255] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pixel_scale must be one of linear, log; got 'sqrt'"):
        batches(dataset, "train", 5, train=False, pixel_scale="sqrt")


def test_bad_requests_raise_clear_errors():
    dataset = toy_dataset()
    with pytest.raises(ValueError, match="toy has no 'valid' split; it has train, validation, test"):
        batches(dataset, "valid", 4, train=False)
    with pytest.raises(ValueError, match="the 'test' split of toy has no examples"):
        batches(dataset, "test", 4, train=False)
    with pytest.raises(ValueError, match="batch_size 32 is larger than the 23 examples"):
        batches(dataset, "train", 32, train=True)
    with pytest.raises(ValueError, match="multiple of the 2 JAX processes"):
        batches(dataset, "train", 5, train=True, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="start_batch must be in"):
        batches(dataset, "train", 5, train=True, start_batch=5)
    assert num_batches(dataset, "train", 32, train=False) == 1  # evaluation pads a small split instead


def test_split_off_is_seeded_and_disjoint():
    examples = toy_dataset().splits["train"]
    rest, held = split_off(examples, 0.2, seed=0)
    assert (len(rest), len(held)) == (18, 5)
    ids = lambda e: {int(e[i]["image"][0, 0, 0]) for i in range(len(e))}  # noqa: E731
    assert ids(rest) | ids(held) == set(range(NUM_EXAMPLES)) and not ids(rest) & ids(held)
    assert ids(split_off(examples, 0.2, seed=0)[1]) == ids(held) != ids(split_off(examples, 0.2, seed=1)[1])


def test_named_tfds_dataset_with_mock_data(tmp_path, monkeypatch):
    # TFDS leaves an empty temporary folder per unbuilt catalog builder (its GCS lookup): keep them in tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tfds.testing.mock_data(num_examples=30):
        dataset = load_dataset("mnist", data_dir=str(tmp_path), seed=0)
        assert dataset.task == "classification" and dataset.num_classes == 10
        assert dataset.target_names == tuple(str(d) for d in range(10)) and dataset.image_shape == (28, 28, 1)
        assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 27, "validation": 3, "test": 30}
        train, validation = dataset.splits["train"], dataset.splits["validation"]
        assert not set(train.indices) & set(validation.indices)
        raw = train.source[int(train.indices[4])]
        np.testing.assert_array_equal(train[4]["image"], raw["image"])
        assert train[4]["label"] == raw["label"]
        out = list(batches(dataset, "validation", 2, train=False))
        assert [b["label"].dtype for b in out] == [np.int32, np.int32]
        np.testing.assert_array_equal(np.concatenate([b["mask"] for b in out]), [1, 1, 1, 0])
        assert next(batches(dataset, "train", 8, train=True))["image"].shape == (8, 28, 28, 1)


def test_named_dataset_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        load_dataset("no_such_dataset", data_dir=str(tmp_path))

    def needs_tensorflow(*args, **kwargs):
        try:
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        except ModuleNotFoundError as missing:
            raise RuntimeError("failed to encode image") from missing

    monkeypatch.setattr(tfds, "data_source", needs_tensorflow)
    with pytest.raises(ImportError, match=r"needs TensorFlow .* pip install 'jaxnets\[tf\]'"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_augmentation_moves_each_image_and_its_targets_by_one_symmetry_drawn_per_example():
    from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry, transform_images

    rng = np.random.default_rng(1)
    names = ("sigma", "xiX", "xiY", "alpha[0][1]", "beta[0][1]")
    examples = [
        {"image": rng.integers(0, 256, (4, 4, 1), dtype=np.uint8), "target": rng.normal(size=5).astype(np.float32)}
        for _ in range(12)
    ]
    dataset = Dataset("csv:toy", "regression", {"train": Examples(examples, target_key="target")}, (4, 4, 1), names)
    symmetry = TargetSymmetry.for_targets(names)

    def moves(batch_size: int, epoch: int) -> dict[int, int]:
        """{example: the symmetry it was moved by}, checking that its image and targets moved alike."""
        found = {}
        for batch in batches(dataset, "train", batch_size, train=True, epoch=epoch, augment=symmetry):
            for row, index in enumerate(batch["index"]):
                source = examples[index]
                pixels = np.rint(batch["image"][row] * 255).astype(np.uint8)
                # random pixels: exactly one of the 8 moves gives the batch's image
                (k,) = [
                    k for k, m in enumerate(SYMMETRIES) if np.array_equal(transform_images(source["image"], m), pixels)
                ]
                np.testing.assert_allclose(batch["target"][row], symmetry.apply(source["target"], SYMMETRIES[k]), 1e-6)
                found[int(index)] = k
        return found

    first = moves(4, epoch=1)
    assert first == moves(3, epoch=1)  # drawn per example from (seed, epoch): the batch size changes nothing
    assert first != moves(4, epoch=2) and len(set(first.values())) > 2
    with pytest.raises(ValueError, match="augment applies to training batches"):
        batches(dataset, "train", 4, train=False, augment=symmetry)
