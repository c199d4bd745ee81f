"""Bad prepared arrays are rejected at setup with a message naming the file, and nothing is kept."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import SinwaveDataModule, WeatherDataModule

MODULES = {"sinwave": (SinwaveDataModule, 1), "weather": (WeatherDataModule, 6)}


def good_splits(d: int, seq_len: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        split: rng.normal(size=(n, seq_len, d))
        for split, n in [("train", 8), ("valid", 2), ("test", 2)]
    }


def with_nan(d: int) -> dict[str, np.ndarray]:
    splits = good_splits(d)
    splits["train"][0, :3, 0] = np.nan
    splits["train"][1, 5, 0] = np.inf
    return splits


def with_float32_overflow(d: int) -> dict[str, np.ndarray]:
    splits = good_splits(d)  # float64: finite here, inf in the float32 the model reads
    splits["test"][1, 7, 0] = 1e39
    return splits


def with_wrong_rank(d: int) -> dict[str, np.ndarray]:
    splits = good_splits(d)
    splits["valid"] = splits["valid"][:, :, 0]
    return splits


def with_short_sequences(d: int) -> dict[str, np.ndarray]:
    return good_splits(d, seq_len=16)  # context_window=16 needs 17 steps


def with_inconsistent_lengths(d: int) -> dict[str, np.ndarray]:
    return dict(good_splits(d), test=good_splits(d, seq_len=30)["test"])


def with_wrong_channels(d: int) -> dict[str, np.ndarray]:
    return good_splits(d + 1)


BAD_SPLITS = {
    "nan": (with_nan, r"train\.npy: contains 4 NaN/inf value\(s\)"),
    "float32 overflow": (with_float32_overflow, r"test\.npy: 1 value\(s\) exceed float32's range"),
    "rank": (with_wrong_rank, r"valid\.npy: array has shape \(2, 40\) \(rank 2\) but must be 3-D"),
    "short": (
        with_short_sequences,
        r"train\.npy: sequences have 16 steps, fewer than context_window \+ 1 = 17",
    ),
    "inconsistent": (
        with_inconsistent_lengths,
        r"splits disagree on \(seq_len, d\).*test\.npy: \(seq_len=30",
    ),
    "channels": (
        with_wrong_channels,
        r"train\.npy: has \d channel\(s\) in its last axis but this dataset needs \d",
    ),
}


def snapshot(directory):
    return sorted(p.name for p in directory.rglob("*"))


@pytest.mark.parametrize("dataset", MODULES)
@pytest.mark.parametrize("problem", BAD_SPLITS)
def test_bad_split_files_are_rejected_by_name(tmp_path, splits_writer, dataset, problem):
    module_class, d = MODULES[dataset]
    make, message = BAD_SPLITS[problem]
    directory = splits_writer(tmp_path / "data", make(d))
    before = snapshot(tmp_path)
    module = module_class(data_dir=str(directory))
    with pytest.raises(ValueError, match=message):
        module.setup()
    assert module.datasets == {}
    assert snapshot(tmp_path) == before  # nothing written next to the data either


@pytest.mark.parametrize("dataset", MODULES)
def test_good_split_files_load(tmp_path, splits_writer, dataset):
    module_class, d = MODULES[dataset]
    module = module_class(data_dir=str(splits_writer(tmp_path / "data", good_splits(d))))
    module.setup()
    assert len(module.datasets["train"]) == 8


@pytest.mark.parametrize("dataset", MODULES)
def test_missing_directory_is_named(tmp_path, dataset):
    module = MODULES[dataset][0](data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.* does not exist .*train\.npy"):
        module.setup()
    assert module.datasets == {}
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("dataset", MODULES)
def test_missing_split_file_is_named(tmp_path, splits_writer, dataset):
    module_class, d = MODULES[dataset]
    splits = good_splits(d)
    del splits["valid"]
    module = module_class(data_dir=str(splits_writer(tmp_path / "data", splits)))
    with pytest.raises(FileNotFoundError, match=r"valid\.npy: file not found"):
        module.setup()
    assert module.datasets == {}


def test_a_failed_setup_can_be_retried_after_fixing_the_file(tmp_path, splits_writer):
    directory = splits_writer(tmp_path / "data", with_nan(1))
    module = SinwaveDataModule(data_dir=str(directory))
    with pytest.raises(ValueError, match="NaN"):
        module.setup()
    splits_writer(directory, good_splits(1))
    module.setup()
    assert len(module.datasets["test"]) == 2
