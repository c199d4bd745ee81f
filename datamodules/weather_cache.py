"""On-disk cache of the prepared weather arrays, keyed to the CSV they came from.

Layout of ``cache_dir``: ``train.npy``, ``valid.npy``, ``test.npy``, ``series.npy`` and
``prepared.json``. The json records the CSV's size and modification time, the window settings
and the normalisation statistics. It is written last and removed first, so it marks a complete
cache: arrays without a matching json are never read.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from datamodules.splits import SPLITS
from datamodules.weather_csv import COLUMNS, CSV_HELP, STRIDE, WINDOW, PreparedWeather

CACHE_FORMAT = 1
MARKER = "prepared.json"
ARRAYS: tuple[str, ...] = SPLITS + ("series",)


def fingerprint(csv_path: str | Path) -> dict[str, Any]:
    """What identifies a preparation: the CSV's size and mtime plus the preparation settings."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found; {CSV_HELP}")
    stat = path.stat()
    return {
        "format": CACHE_FORMAT,
        "csv_name": path.name,
        "csv_size": stat.st_size,
        "csv_mtime_ns": stat.st_mtime_ns,
        "window": WINDOW,
        "stride": STRIDE,
    }


def read_cache(cache_dir: str | Path, expected: dict[str, Any]) -> PreparedWeather | None:
    """The cached preparation if it matches ``expected``, else None (stale, partial or absent).

    A cache is only ever our own output, so anything unexpected in it (a torn or foreign file, a
    record of another shape) means "rebuild from the CSV", never an error about the CSV.
    """
    directory = Path(cache_dir)
    try:
        record = json.loads((directory / MARKER).read_text())
        if not _is_record(record) or record["fingerprint"] != expected:
            return None
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in ARRAYS}
    except (OSError, ValueError, EOFError):  # EOFError: an empty .npy
        return None
    return PreparedWeather(
        series=arrays["series"],
        splits={split: arrays[split] for split in SPLITS},
        mean=record["mean"],
        std=record["std"],
    )


def _is_record(record: Any) -> bool:
    """Whether ``record`` has the layout write_cache gives prepared.json."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("fingerprint"), dict)
        and all(
            isinstance(record.get(stat), dict)
            and list(record[stat]) == list(COLUMNS)
            and all(isinstance(v, float) for v in record[stat].values())
            for stat in ("mean", "std")
        )
    )


def write_cache(cache_dir: str | Path, prepared: PreparedWeather, key: dict[str, Any]) -> None:
    """Store ``prepared`` in ``cache_dir``; the marker goes last so readers see all or nothing."""
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    arrays = dict(prepared.splits, series=prepared.series)
    for name in ARRAYS:
        _write_atomically(
            directory / f"{name}.npy", lambda handle, a=arrays[name]: np.save(handle, a)
        )
    record = json.dumps({"fingerprint": key, "mean": prepared.mean, "std": prepared.std}, indent=2)
    _write_atomically(directory / MARKER, lambda handle: handle.write(record.encode()))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    # Write beside the target and rename over it: a reader or a crash never sees a torn file.
    temporary = _create_beside(path)
    try:
        with temporary.open("wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> Path:
    """A new empty file next to ``path``, with the permissions of any new file (0o666 less the
    umask, so usually 0o644); ``tempfile`` would make it 0o600, readable by its owner only."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {path}")
