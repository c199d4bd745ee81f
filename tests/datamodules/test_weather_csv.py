"""Preparing Turbine_Data.csv reproduces the published weather arrays, without Lightning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datamodules.splits import SPLITS
from datamodules.weather_csv import COLUMNS, make_windows, prepare_weather, split_series


def test_published_csv_round_trip_reproduces_every_split(published_weather_csv, shared_dir):
    # 144 rows of 2017, 200 repeated lines, 150 without power, 150 missing a feature.
    assert len(pd.read_csv(published_weather_csv, usecols=[0])) == 61427 + 144 + 200 + 150 + 150
    prepared = prepare_weather(published_weather_csv)
    directory = shared_dir("weather")
    np.testing.assert_allclose(
        prepared.series, np.load(directory / "series.npy"), rtol=0, atol=1e-6
    )
    for split in SPLITS:
        expected = np.load(directory / f"{split}.npy")
        assert prepared.splits[split].shape == expected.shape
        np.testing.assert_allclose(prepared.splits[split], expected, rtol=0, atol=1e-6)


def test_published_csv_statistics_are_recovered(published_weather_csv, readme_stats):
    prepared = prepare_weather(published_weather_csv)
    mean, std = readme_stats
    assert list(prepared.mean) == list(COLUMNS)
    np.testing.assert_allclose([prepared.mean[c] for c in COLUMNS], mean, rtol=1e-9)
    np.testing.assert_allclose([prepared.std[c] for c in COLUMNS], std, rtol=1e-9)


def test_split_points_follow_the_published_rounding():
    parts = split_series(np.zeros((61427, 6)))
    assert [len(parts[s]) for s in SPLITS] == [49141, 6143, 6143]


def test_windows_start_every_stride_rows():
    series = np.arange(1200.0).reshape(600, 2)  # (T, d)
    windows = make_windows(series, window=500, stride=50)
    assert windows.shape == (3, 500, 2)
    np.testing.assert_array_equal(windows[2], series[100:600])


def test_only_the_recipe_filters_drop_rows(tmp_path, kaggle_frame_maker):
    raw = np.random.default_rng(1).normal(size=(6000, len(COLUMNS)))
    frame = kaggle_frame_maker(raw, seed=1, extra_rows=False)
    # Same readings at a new time are a new observation, not a duplicate line.
    frame.loc[1, COLUMNS] = frame.loc[0, COLUMNS]
    raw[1] = raw[0]
    frame.to_csv(tmp_path / "Turbine_Data.csv", index=False)
    prepared = prepare_weather(tmp_path / "Turbine_Data.csv")
    assert prepared.series.shape == (6000, 6)
    expected = (raw - raw.mean(0)) / raw.std(0, ddof=1)
    np.testing.assert_allclose(prepared.series, expected, atol=1e-12)


def test_column_order_in_the_csv_does_not_matter(tmp_path, kaggle_frame_maker):
    raw = np.random.default_rng(2).normal(size=(5000, len(COLUMNS)))
    frame = kaggle_frame_maker(raw, seed=2)
    frame.to_csv(tmp_path / "a.csv", index=False)
    reordered = frame[[frame.columns[0]] + sorted(frame.columns[1:], reverse=True)]
    reordered.to_csv(tmp_path / "b.csv", index=False)
    np.testing.assert_array_equal(
        prepare_weather(tmp_path / "a.csv").series, prepare_weather(tmp_path / "b.csv").series
    )


def test_missing_columns_are_named(tmp_path, kaggle_frame_maker):
    frame = kaggle_frame_maker(np.zeros((10, 6)), extra_rows=False)
    frame.drop(columns=["RotorRPM", "ActivePower"]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        ValueError, match=r"t\.csv: missing column\(s\) \['RotorRPM', 'ActivePower'\]"
    ):
        prepare_weather(tmp_path / "t.csv")


def test_unparseable_timestamps_are_reported(tmp_path, kaggle_frame_maker):
    frame = kaggle_frame_maker(np.zeros((10, 6)), extra_rows=False)
    frame[""] = frame[""].astype(str)
    frame.iloc[3, 0] = "yesterday"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        ValueError, match=r"1 timestamp\(s\) in the first column could not be parsed"
    ):
        prepare_weather(tmp_path / "t.csv")


def test_too_few_rows_for_a_window_is_reported(tmp_path, weather_csv_maker):
    path = weather_csv_maker(tmp_path / "t.csv", n_rows=1000)
    with pytest.raises(
        ValueError, match=r"1000 rows remain .* shorter than one window of 500 rows"
    ):
        prepare_weather(path)


def test_non_numeric_feature_is_reported(tmp_path, kaggle_frame_maker):
    frame = kaggle_frame_maker(np.zeros((10, 6)), extra_rows=False)
    frame["WindSpeed"] = frame["WindSpeed"].astype(object)
    frame.loc[4, "WindSpeed"] = "calm"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'WindSpeed' holds non-numeric values"):
        prepare_weather(tmp_path / "t.csv")


def test_missing_csv_points_at_kaggle(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"Turbine_Data\.csv.*Kaggle dataset \"Wind Power Forecasting\""
    ):
        prepare_weather(tmp_path / "Turbine_Data.csv")


def test_kaggle_frame_header_matches_the_kaggle_file(tmp_path, kaggle_frame_maker):
    kaggle_frame_maker(np.zeros((3, 6)), extra_rows=False).to_csv(tmp_path / "t.csv", index=False)
    header = pd.read_csv(tmp_path / "t.csv", nrows=0).columns
    assert header[0] == "Unnamed: 0"
    assert {"ActivePower", "AmbientTemperatue", "WindSpeed", "WTG"} <= set(header)


# -- files that are not a turbine CSV: a ValueError naming the file and the problem ---------------
def test_empty_file_is_named(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"t\.csv: the file is empty \(0 bytes\)"):
        prepare_weather(tmp_path / "t.csv")


def test_blank_lines_only_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("\n\n\n")
    with pytest.raises(ValueError, match=r"t\.csv: the file holds no CSV header"):
        prepare_weather(tmp_path / "t.csv")


def test_binary_file_is_named(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((4, 6)))  # a prepared array passed as the CSV
    with pytest.raises(ValueError, match=r"t\.npy: not a text CSV file but binary data"):
        prepare_weather(tmp_path / "t.npy")


def test_non_utf8_bytes_are_named(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"\x89\xff\xfe" * 100)
    with pytest.raises(ValueError, match=r"t\.csv: .*byte 0x89 at offset 0 is not UTF-8 text"):
        prepare_weather(tmp_path / "t.csv")


def test_header_without_rows_is_named(tmp_path, kaggle_frame_maker):
    frame = kaggle_frame_maker(np.zeros((3, 6)), extra_rows=False)
    frame.iloc[:0].to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"t\.csv: has a header but no data rows"):
        prepare_weather(tmp_path / "t.csv")


def test_entirely_missing_column_is_named(tmp_path, kaggle_frame_maker):
    raw = np.random.default_rng(3).normal(size=(6000, len(COLUMNS)))
    frame = kaggle_frame_maker(raw, seed=3)
    frame["RotorRPM"] = np.nan
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        ValueError, match=r"t\.csv: column\(s\) \['RotorRPM'\] hold no values \(every row is empty"
    ):
        prepare_weather(tmp_path / "t.csv")
