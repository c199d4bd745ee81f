"""Prepare the wind-turbine series from Kaggle's "Wind Power Forecasting" ``Turbine_Data.csv``.

Pure pandas/numpy, no Lightning, following shared/data/README.md step by step:

1. drop duplicate rows; keep rows with timestamp year >= 2018;
2. drop rows missing ActivePower, then rows missing any of the five features;
3. keep ``COLUMNS`` (five features, then the ActivePower target);
4. z-normalise each column with the mean and sample std (ddof=1) of all kept rows;
5. split chronologically: rows ``[0, 0.8 T)`` train, ``[0.8 T, 0.9 T)`` valid, the rest test
   (integer floor, so T = 61427 cuts at 49141 and 55284);
6. cut each split into windows of 500 rows with stride 50.

Shapes: T rows, d = 6 columns; series ``(T, d)``, each split ``(N, 500, d)``.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES: tuple[str, ...] = (
    "WindSpeed",
    "RotorRPM",
    "GeneratorRPM",
    "GearboxOilTemperature",
    "GearboxBearingTemperature",
)
TARGET = "ActivePower"
COLUMNS: tuple[str, ...] = FEATURES + (TARGET,)
FIRST_YEAR = 2018
WINDOW = 500
STRIDE = 50
CSV_HELP = (
    'download Turbine_Data.csv from the Kaggle dataset "Wind Power Forecasting" and pass its path '
    "as csv_path, or point data_dir at prepared train.npy / valid.npy / test.npy"
)


@dataclass(frozen=True)
class PreparedWeather:
    """The prepared series, its windowed splits and the statistics used to normalise it."""

    series: np.ndarray  # (T, d) normalised, chronological
    splits: dict[str, np.ndarray]  # split -> (N, WINDOW, d)
    mean: dict[str, float]  # column -> mean of the kept raw values
    std: dict[str, float]  # column -> sample std (ddof=1) of the kept raw values


def read_turbine_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read the CSV; the first column is the timestamp, renamed ``timestamp``."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found; {CSV_HELP}")
    check_is_text(path)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:  # nothing but blank lines: not even a header
        raise ValueError(f"{path}: the file holds no CSV header, only blank lines; {CSV_HELP}") \
            from None
    except (UnicodeDecodeError, pd.errors.ParserError) as error:  # past the sniffed head
        raise ValueError(f"{path}: not a readable CSV ({error}); {CSV_HELP}") from None
    check_columns(frame, path)
    return frame.rename(columns={frame.columns[0]: "timestamp"})


def check_is_text(path: Path, head_bytes: int = 1 << 16) -> None:
    """Refuse an empty or binary file before pandas does, with a message naming the file.

    pandas reports these as ``EmptyDataError`` or ``UnicodeDecodeError`` tracebacks that say
    nothing of which file was meant; a NUL byte or bytes that are not UTF-8 in the head mark a
    binary file (an ``.npy``, a zip archive of the CSV, ...).
    """
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); {CSV_HELP}")
    with path.open("rb") as handle:
        head = handle.read(head_bytes)
    nul = head.find(b"\x00")
    why = f"a NUL byte at offset {nul}" if nul >= 0 else None
    try:
        # final=False: a character cut at the end of the head is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        why = why or f"byte {head[error.start]:#04x} at offset {error.start} is not UTF-8 text"
    if why:
        raise ValueError(f"{path}: not a text CSV file but binary data ({why}); {CSV_HELP}")


def check_columns(frame: pd.DataFrame, path: Path) -> None:
    """The needed columns exist, the file has rows, and no needed column is entirely empty."""
    missing = [column for column in COLUMNS if column not in frame.columns[1:]]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the CSV needs a timestamp first column and "
            f"{list(COLUMNS)} ({CSV_HELP})"
        )
    if frame.empty:
        raise ValueError(f"{path}: has a header but no data rows; {CSV_HELP}")
    # Checked here, since filtering would drop every row and report only "0 rows left".
    empty = [column for column in COLUMNS if frame[column].isna().all()]
    if empty:
        raise ValueError(
            f"{path}: column(s) {empty} hold no values (every row is empty or NaN); {CSV_HELP}"
        )


def select_rows(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Steps 1-3: drop duplicates and pre-2018 rows, then rows missing a needed value."""
    # A duplicate is a repeated line, timestamp included: equal readings at different times
    # are distinct observations.
    frame = frame.drop_duplicates()
    time = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601", errors="coerce")
    if time.isna().any():
        raise ValueError(
            f"{source}: {int(time.isna().sum())} timestamp(s) in the first column could not be "
            "parsed; the first column must hold ISO dates such as 2018-01-01 00:00:00+00:00"
        )
    frame = frame[(time.dt.year >= FIRST_YEAR).to_numpy()]
    frame = frame.dropna(subset=[TARGET])
    frame = frame.dropna(subset=list(FEATURES))
    return frame[list(COLUMNS)]


def to_float_array(frame: pd.DataFrame, source: str) -> np.ndarray:
    """The selected columns as a finite float64 array ``(T, d)``."""
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(f"{source}: column {column!r} holds non-numeric values; fix the CSV")
    values = frame.to_numpy(dtype=np.float64)  # (T, d)
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if n_bad:
        raise ValueError(
            f"{source}: {n_bad} infinite value(s) in columns {list(COLUMNS)}; fix the CSV"
        )
    return values


def normalise(values: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-normalise each column; return ``(normalised, mean, std)``."""
    if values.shape[0] < 2:
        raise ValueError(f"{source}: {values.shape[0]} row(s) left after filtering; {CSV_HELP}")
    mean = values.mean(axis=0)  # (d,)
    std = values.std(axis=0, ddof=1)  # (d,)
    constant = [column for column, s in zip(COLUMNS, std, strict=True) if s == 0]
    if constant:
        raise ValueError(f"{source}: column(s) {constant} are constant and cannot be normalised")
    return (values - mean) / std, mean, std


def split_series(series: np.ndarray) -> dict[str, np.ndarray]:
    """Cut ``(T, d)`` chronologically at floor(0.8 T) and floor(0.9 T)."""
    n = series.shape[0]
    train_end, valid_end = n * 8 // 10, n * 9 // 10
    return {
        "train": series[:train_end],
        "valid": series[train_end:valid_end],
        "test": series[valid_end:],
    }


def make_windows(series: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Windows ``(N, window, d)`` starting every ``stride`` rows; N = (T - window) // stride + 1."""
    views = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)  # (T-w+1, d, w)
    return np.ascontiguousarray(views[::stride].transpose(0, 2, 1))  # (N, w, d)


def prepare_weather(
    csv_path: str | Path, window: int = WINDOW, stride: int = STRIDE
) -> PreparedWeather:
    """Run the whole preparation on ``csv_path``; raise ValueError naming the file on bad input."""
    source = str(Path(csv_path).expanduser())
    values = to_float_array(select_rows(read_turbine_csv(csv_path), source), source)  # (T, d)
    series, mean, std = normalise(values, source)
    parts = split_series(series)
    short = {split: len(part) for split, part in parts.items() if len(part) < window}
    if short:
        raise ValueError(
            f"{source}: {series.shape[0]} rows remain after filtering; split row counts {short} "
            f"are shorter than one window of {window} rows; use the full Turbine_Data.csv"
        )
    return PreparedWeather(
        series=series,
        splits={split: make_windows(part, window, stride) for split, part in parts.items()},
        mean=dict(zip(COLUMNS, mean.tolist(), strict=True)),
        std=dict(zip(COLUMNS, std.tolist(), strict=True)),
    )


def window_timestamps(
    csv_path: str | Path, window: int = WINDOW, stride: int = STRIDE
) -> dict[str, np.ndarray]:
    """When each step of each prepared window was recorded: split -> ``(N, window)`` UTC times
    (``datetime64``, no time zone), from the rows :func:`prepare_weather` keeps, cut and windowed
    as it cuts and windows them (so entry ``[n, t]`` is the time of step t of sequence n)."""
    source = str(Path(csv_path).expanduser())
    frame = read_turbine_csv(csv_path)
    kept = select_rows(frame, source).index  # the labels of the rows kept, in order
    time = pd.to_datetime(frame.loc[kept, "timestamp"], utc=True, format="ISO8601")
    parts = split_series(time.dt.tz_localize(None).to_numpy()[:, None])  # (T, 1) per split
    return {split: make_windows(part, window, stride)[..., 0] for split, part in parts.items()}
