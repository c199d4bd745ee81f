"""WeatherDataModule: prepared arrays, the CSV path with its cache, and argument errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import datamodules.weather as weather_module
from datamodules import WeatherDataModule
from datamodules.splits import SPLITS
from datamodules.weather_csv import COLUMNS


@pytest.fixture
def small_csv(tmp_path, weather_csv_maker):
    """5000 kept rows: the fewest whose valid and test splits still hold one 500-row window."""
    return weather_csv_maker(tmp_path / "kaggle" / "Turbine_Data.csv", n_rows=5000)


def cache_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_published_arrays_load_as_float32(shared_dir):
    directory = shared_dir("weather")
    module = WeatherDataModule(data_dir=str(directory))
    module.setup()
    expected = np.load(directory / "valid.npy").astype(np.float32)
    np.testing.assert_array_equal(module.datasets["valid"].inputs.numpy(), expected[:, :, :5])
    np.testing.assert_array_equal(module.datasets["valid"].targets.numpy(), expected[:, :, 5:])
    assert module.normalisation is None


def test_csv_path_serves_the_published_splits(
    published_weather_csv, shared_dir, readme_stats, tmp_path
):
    module = WeatherDataModule(
        csv_path=str(published_weather_csv), cache_dir=str(tmp_path / "cache")
    )
    module.prepare_data()
    module.setup()
    for split in SPLITS:
        expected = np.load(shared_dir("weather") / f"{split}.npy").astype(np.float32)
        np.testing.assert_allclose(
            module.datasets[split].targets.numpy(), expected[:, :, 5:], atol=1e-6
        )
    mean, std = readme_stats
    np.testing.assert_allclose([module.normalisation["mean"][c] for c in COLUMNS], mean, rtol=1e-9)
    np.testing.assert_allclose([module.normalisation["std"][c] for c in COLUMNS], std, rtol=1e-9)


def test_cache_defaults_to_prepared_next_to_the_csv(small_csv):
    module = WeatherDataModule(csv_path=str(small_csv))
    module.setup()
    cache = small_csv.parent / "prepared"
    assert module.resolved_cache_dir == cache
    assert cache_files(cache) == [
        "prepared.json",
        "series.npy",
        "test.npy",
        "train.npy",
        "valid.npy",
    ]
    record = json.loads((cache / "prepared.json").read_text())
    assert record["fingerprint"]["csv_size"] == small_csv.stat().st_size
    assert record["mean"] == module.normalisation["mean"]
    cached_train = np.load(cache / "train.npy").astype(np.float32)
    np.testing.assert_array_equal(cached_train[:, :, :5], module.datasets["train"].inputs.numpy())


def test_matching_cache_is_reused_without_reading_the_csv(small_csv, monkeypatch):
    first = WeatherDataModule(csv_path=str(small_csv))
    first.setup()

    def fail(*args, **kwargs):
        raise AssertionError("the CSV was prepared again")

    monkeypatch.setattr(weather_module, "prepare_weather", fail)
    second = WeatherDataModule(csv_path=str(small_csv))
    second.setup()
    np.testing.assert_array_equal(
        first.datasets["test"].inputs.numpy(), second.datasets["test"].inputs.numpy()
    )
    assert second.normalisation == first.normalisation


def test_changed_csv_invalidates_the_cache(small_csv, weather_csv_maker):
    first = WeatherDataModule(csv_path=str(small_csv))
    first.setup()
    weather_csv_maker(small_csv, n_rows=5500, seed=1)
    stat = small_csv.stat()
    os.utime(small_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-clock filesystems
    second = WeatherDataModule(csv_path=str(small_csv))
    second.setup()
    assert second.normalisation != first.normalisation
    record = json.loads((small_csv.parent / "prepared" / "prepared.json").read_text())
    assert record["fingerprint"]["csv_size"] == small_csv.stat().st_size


def test_cache_without_its_marker_is_rebuilt(small_csv):
    WeatherDataModule(csv_path=str(small_csv)).setup()
    cache = small_csv.parent / "prepared"
    (cache / "prepared.json").unlink()
    np.save(cache / "train.npy", np.zeros((1, 500, 6)))  # a torn earlier write
    module = WeatherDataModule(csv_path=str(small_csv))
    module.setup()
    assert len(module.datasets["train"]) > 1
    assert (cache / "prepared.json").is_file()


def test_neither_source_says_where_to_get_the_csv():
    with pytest.raises(
        ValueError,
        match=r"exactly one of data_dir and csv_path, neither .*Turbine_Data\.csv.*Kaggle",
    ):
        WeatherDataModule()


def test_both_sources_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data_dir and csv_path, both were given"):
        WeatherDataModule(data_dir=str(tmp_path), csv_path=str(tmp_path / "t.csv"))


def test_missing_csv_is_named_and_nothing_is_cached(tmp_path):
    module = WeatherDataModule(csv_path=str(tmp_path / "Turbine_Data.csv"))
    with pytest.raises(FileNotFoundError, match=r"Turbine_Data\.csv: CSV file not found; download"):
        module.setup()
    assert cache_files(tmp_path) == []
    assert module.datasets == {} and module.normalisation is None


def test_csv_missing_columns_is_named_and_nothing_is_cached(tmp_path, kaggle_frame_maker):
    path = tmp_path / "Turbine_Data.csv"
    kaggle_frame_maker(np.zeros((10, 6)), extra_rows=False).drop(columns=["GeneratorRPM"]).to_csv(
        path, index=False
    )
    module = WeatherDataModule(csv_path=str(path))
    with pytest.raises(
        ValueError, match=r"Turbine_Data\.csv: missing column\(s\) \['GeneratorRPM'\]"
    ):
        module.prepare_data()
    assert cache_files(tmp_path / "prepared") == []
    assert module.datasets == {} and module.normalisation is None


def test_csv_with_infinite_values_is_named_and_nothing_is_cached(tmp_path, kaggle_frame_maker):
    path = tmp_path / "Turbine_Data.csv"
    frame = kaggle_frame_maker(np.ones((6000, 6)), extra_rows=False)
    frame.loc[[10, 20], "WindSpeed"] = np.inf
    frame.to_csv(path, index=False)
    module = WeatherDataModule(csv_path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"Turbine_Data\.csv: 2 infinite value\(s\)"):
        module.setup()
    assert cache_files(tmp_path / "cache") == []


def test_context_longer_than_a_window_is_rejected_before_caching(small_csv):
    module = WeatherDataModule(csv_path=str(small_csv), context_window=500)
    with pytest.raises(
        ValueError, match=r"train split\): sequences have 500 steps, fewer than context_window \+ 1"
    ):
        module.setup()
    assert cache_files(small_csv.parent / "prepared") == []
    assert module.datasets == {} and module.normalisation is None


def test_cached_preparation_is_still_checked_against_the_context(small_csv):
    WeatherDataModule(csv_path=str(small_csv)).setup()
    module = WeatherDataModule(csv_path=str(small_csv), context_window=500)
    with pytest.raises(ValueError, match=r"fewer than context_window \+ 1 = 501"):
        module.setup()
    assert module.datasets == {} and module.normalisation is None


def test_too_few_csv_rows_is_rejected_before_caching(tmp_path, weather_csv_maker):
    path = weather_csv_maker(tmp_path / "Turbine_Data.csv", n_rows=800)
    module = WeatherDataModule(csv_path=str(path))
    with pytest.raises(ValueError, match="shorter than one window of 500 rows"):
        module.setup()
    assert cache_files(tmp_path / "prepared") == []


def test_cache_dir_needs_a_csv(tmp_path):
    with pytest.raises(ValueError, match="cache_dir only applies with csv_path"):
        WeatherDataModule(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


# -- a damaged cache is rebuilt from the CSV, never blamed on it -----------------------------------
def nan_train(cache):
    train = np.load(cache / "train.npy")
    train[0, 0, 0] = np.nan
    np.save(cache / "train.npy", train)


DAMAGE = {
    "nan_in_an_array": nan_train,
    "empty_array_file": lambda cache: (cache / "valid.npy").write_bytes(b""),
    "truncated_array_file": lambda cache: (cache / "test.npy").write_bytes(
        (cache / "test.npy").read_bytes()[:1000]),
    "marker_not_a_record": lambda cache: (cache / "prepared.json").write_text("[]"),
    "marker_without_statistics": lambda cache: (cache / "prepared.json").write_text(json.dumps(
        {"fingerprint": json.loads((cache / "prepared.json").read_text())["fingerprint"]})),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_rebuilt_from_the_csv(small_csv, damage):
    first = WeatherDataModule(csv_path=str(small_csv))
    first.setup()
    cache = small_csv.parent / "prepared"
    DAMAGE[damage](cache)
    second = WeatherDataModule(csv_path=str(small_csv))
    second.setup()
    np.testing.assert_array_equal(
        first.datasets["train"].inputs.numpy(), second.datasets["train"].inputs.numpy()
    )
    assert second.normalisation == first.normalisation
    train = np.load(cache / "train.npy")  # the cache was written again, whole
    assert np.isfinite(train).all() and len(np.load(cache / "valid.npy")) > 0


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_cache_files_get_the_permissions_of_any_new_file(small_csv, umask):
    old = os.umask(umask)
    try:
        WeatherDataModule(csv_path=str(small_csv)).setup()
    finally:
        os.umask(old)
    cache = small_csv.parent / "prepared"
    modes = {name: (cache / name).stat().st_mode & 0o777 for name in cache_files(cache)}
    assert modes == {name: 0o666 & ~umask for name in modes} and len(modes) == 5
