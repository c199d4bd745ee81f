"""Fixtures for the datamodule tests: the published reference arrays and Kaggle-shaped CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules.splits import SPLITS
from datamodules.weather_csv import COLUMNS

# The published arrays live outside the repository (never vendored): <repo>/../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

# Column order of Kaggle's Turbine_Data.csv after the unnamed timestamp column.
KAGGLE_COLUMNS = (
    "ActivePower", "AmbientTemperatue", "BearingShaftTemperature", "Blade1PitchAngle",
    "Blade2PitchAngle", "Blade3PitchAngle", "ControlBoxTemperature", "GearboxBearingTemperature",
    "GearboxOilTemperature", "GeneratorRPM", "GeneratorWinding1Temperature",
    "GeneratorWinding2Temperature", "HubTemperature", "MainBoxTemperature", "NacellePosition",
    "ReactivePower", "RotorRPM", "TurbineStatus", "WTG", "WindDirection", "WindSpeed",
)  # fmt: skip

# The statistics the published series was normalised with (shared/data/README.md).
README_MEAN = (5.935267, 9.894092, 1103.305483, 57.624848, 64.502379, 630.689148)
README_STD = (2.563903, 4.702846, 524.089411, 6.195655, 9.735098, 608.064994)


def find_shared_dir(name: str) -> Path:
    """``shared/data/<name>``, skipping the test when the reference copies are not present."""
    directory = SHARED_DATA / name
    if not all((directory / f"{split}.npy").is_file() for split in SPLITS):
        pytest.skip(
            f"reference arrays not found in {directory.resolve()} (outside the repo checkout)"
        )
    return directory


def write_splits(directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Save ``{split: array}`` as ``<split>.npy`` files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, array in arrays.items():
        np.save(directory / f"{split}.npy", array)
    return directory


def kaggle_frame(raw: np.ndarray, seed: int = 0, extra_rows: bool = True) -> pd.DataFrame:
    """A Turbine_Data-shaped frame whose rows kept by the preparation are exactly ``raw``.

    ``raw`` is ``(T, 6)`` in ``COLUMNS`` order. With ``extra_rows`` the frame also holds rows the
    preparation must drop, interleaved with the kept ones: a 2017 day, repeated lines, rows
    without ActivePower and rows missing one feature.
    """
    rng = np.random.default_rng(seed)
    n = raw.shape[0]
    kept = _random_columns(rng, n)
    kept[list(COLUMNS)] = raw
    # Columns the preparation ignores may be missing without dropping the row.
    kept.loc[rng.random(n) < 0.05, "Blade2PitchAngle"] = np.nan
    parts, keys = [kept], [np.arange(n) * 4.0]
    if extra_rows:
        parts, keys = _add_dropped_rows(rng, kept, parts, keys)
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.iloc[np.argsort(np.concatenate(keys), kind="stable")].reset_index(drop=True)
    # The extra rows open with a day of 2017, so the kept rows start on 2018-01-01 either way.
    return _add_timestamps(frame, start="2017-12-31" if extra_rows else "2018-01-01")


def _random_columns(rng: np.random.Generator, n: int) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(n, len(KAGGLE_COLUMNS))), columns=list(KAGGLE_COLUMNS))
    frame["WTG"] = "G01"
    frame["is_repeat"] = False
    return frame


def _add_dropped_rows(
    rng: np.random.Generator, kept: pd.DataFrame, parts: list, keys: list
) -> tuple[list, list]:
    n = len(kept)
    early = _random_columns(rng, 144)  # 2017-12-31, one day of 10-minute readings
    repeats = kept.iloc[rng.choice(n, 200, replace=False)].assign(is_repeat=True)
    no_power = _random_columns(rng, 150)
    no_power["ActivePower"] = np.nan
    no_feature = _random_columns(rng, 150)
    for row, column in enumerate(rng.choice(COLUMNS[:-1], 150)):
        no_feature.iloc[row, no_feature.columns.get_loc(column)] = np.nan
    parts = parts + [early, repeats, no_power, no_feature]
    keys = keys + [
        np.linspace(-2.0, -1.0, 144),
        repeats.index.to_numpy() * 4.0 + 1,  # right after the line it repeats
        rng.choice(n, 150) * 4.0 + 2,
        rng.choice(n, 150) * 4.0 + 3,
    ]
    return parts, keys


def _add_timestamps(frame: pd.DataFrame, start: str) -> pd.DataFrame:
    time = pd.date_range(start, periods=len(frame), freq="10min", tz="UTC")
    time = pd.Series(time).mask(frame["is_repeat"]).ffill()  # a repeated line repeats its time
    frame = frame.drop(columns="is_repeat")
    frame.insert(0, "", time.to_numpy())
    return frame


@pytest.fixture(scope="session")
def published_weather_csv(tmp_path_factory) -> Path:
    """The published series de-normalised with the README statistics, written as a Kaggle CSV."""
    series = np.load(find_shared_dir("weather") / "series.npy")  # (61427, 6)
    raw = series * np.array(README_STD) + np.array(README_MEAN)
    path = tmp_path_factory.mktemp("kaggle") / "Turbine_Data.csv"
    kaggle_frame(raw).to_csv(path, index=False)
    return path


def small_weather_csv(path: Path, n_rows: int, seed: int = 0) -> Path:
    """A Kaggle-shaped CSV of ``n_rows`` random kept rows (plus rows to drop)."""
    raw = np.random.default_rng(seed).normal(size=(n_rows, len(COLUMNS)))
    path.parent.mkdir(parents=True, exist_ok=True)
    kaggle_frame(raw, seed).to_csv(path, index=False)
    return path


# Helpers reach the tests as fixtures rather than imports, so they work under any import mode.


@pytest.fixture
def shared_dir():
    """Function ``name -> shared/data/<name>`` that skips the test when the data is absent."""
    return find_shared_dir


@pytest.fixture
def splits_writer():
    """Function ``(directory, {split: array}) -> directory`` saving ``.npy`` splits."""
    return write_splits


@pytest.fixture
def kaggle_frame_maker():
    """Function ``(raw (T, 6), seed, extra_rows) -> DataFrame`` shaped like Turbine_Data.csv."""
    return kaggle_frame


@pytest.fixture
def weather_csv_maker():
    """Function ``(path, n_rows, seed) -> path`` writing a small random Kaggle-shaped CSV."""
    return small_weather_csv


@pytest.fixture
def readme_stats() -> tuple[np.ndarray, np.ndarray]:
    """The mean and std the published weather series was normalised with."""
    return np.array(README_MEAN), np.array(README_STD)
