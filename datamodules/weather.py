"""Wind-turbine power forecasting: five turbine readings in, ActivePower out.

Data comes either from prepared ``.npy`` splits (``data_dir``) or from Kaggle's
``Turbine_Data.csv`` (``csv_path``), prepared by :func:`~datamodules.weather_csv.prepare_weather`
and cached next to the CSV. Each split is ``(N, 500, 6)``: columns ``COLUMNS``, target last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import SequenceDataModule, default_input_columns
from datamodules.splits import SPLITS, SplitArray, check_splits, load_split_files
from datamodules.weather_cache import fingerprint, read_cache, write_cache
from datamodules.weather_csv import (
    COLUMNS,
    CSV_HELP,
    PreparedWeather,
    prepare_weather,
    window_timestamps,
)


class WeatherDataModule(SequenceDataModule):
    """Turbine readings: inputs are the five features, the target is ActivePower.

    Give exactly one of ``data_dir`` and ``csv_path``.

    Args:
        data_dir: folder with prepared ``train.npy`` / ``valid.npy`` / ``test.npy``.
        csv_path: Kaggle "Wind Power Forecasting" ``Turbine_Data.csv``, prepared on first use.
        cache_dir: where arrays prepared from ``csv_path`` are kept; default ``prepared/`` next
            to the CSV. A cache is reused only while the CSV's size and mtime are unchanged.
        batch_size: sequences per batch.
        num_workers: dataloader worker processes.
        context_window: steps the model reads before predicting the next one.
        seed: unused here (weather is not generated); kept so every datamodule takes the same
            arguments.
    """

    channels = COLUMNS
    input_columns = default_input_columns(len(COLUMNS))
    target_column = -1

    def __init__(
        self,
        data_dir: str | None = None,
        csv_path: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        context_window: int = 16,
        seed: int = 0,
        shuffle_eval: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, context_window=context_window,
            shuffle_eval=shuffle_eval,
        )
        if (data_dir is None) == (csv_path is None):
            given = "both were given" if data_dir is not None else "neither was given"
            raise ValueError(
                f"WeatherDataModule needs exactly one of data_dir and csv_path, {given}; {CSV_HELP}"
            )
        if cache_dir is not None and csv_path is None:
            raise ValueError("cache_dir only applies with csv_path; drop it when using data_dir")
        self.save_hyperparameters(ignore=["_instantiator"])
        self.data_dir = data_dir
        self.csv_path = csv_path
        self.cache_dir = cache_dir
        self.seed = seed
        self.normalisation: dict[str, dict[str, float]] | None = None

    @property
    def resolved_cache_dir(self) -> Path | None:
        """Where CSV preparations are cached (None with ``data_dir``)."""
        if self.csv_path is None:
            return None
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(self.csv_path).expanduser().parent / "prepared"

    def timestamps(self, split: str) -> np.ndarray | None:
        """When each step of ``split``'s sequences was recorded, ``(N, L)`` UTC ``datetime64``
        (no time zone), read from ``csv_path``; None with ``data_dir`` (arrays carry no times)."""
        if self.csv_path is None:
            return None
        return window_timestamps(self.csv_path)[split]

    def prepare_data(self) -> None:
        # Lightning runs this on one process only, so the CSV is prepared and cached once.
        if self.csv_path is not None:
            self._prepared()

    def load_splits(self) -> dict[str, SplitArray]:
        if self.data_dir is not None:
            return load_split_files(self.data_dir)
        prepared = self._prepared()  # checked, so the statistics below belong to kept data
        self.normalisation = {"mean": dict(prepared.mean), "std": dict(prepared.std)}
        return self._described(prepared)

    def _prepared(self) -> PreparedWeather:
        """The cached preparation of ``csv_path``, preparing and caching it if needed."""
        key = fingerprint(self.csv_path)
        cached = read_cache(self.resolved_cache_dir, key)
        if cached is not None and self._passes_checks(cached):
            return cached
        # No cache, or one that fails the checks: the CSV decides. A damaged cache is then
        # replaced; a preparation this module rejects raises naming the CSV and is never cached.
        prepared = prepare_weather(self.csv_path)
        check_splits(self._described(prepared), len(self.channels), self.context_window)
        write_cache(self.resolved_cache_dir, prepared, key)
        return prepared

    def _passes_checks(self, prepared: PreparedWeather) -> bool:
        # Checked even when the fingerprint matches: the files may have been damaged since, and
        # context_window may have changed since the cache was made.
        try:
            check_splits(self._described(prepared), len(self.channels), self.context_window)
        except ValueError:
            return False
        return True

    def _described(self, prepared: PreparedWeather) -> dict[str, SplitArray]:
        return {
            split: SplitArray(f"{self.csv_path} ({split} split)", prepared.splits[split])
            for split in SPLITS
        }
