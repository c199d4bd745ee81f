"""Lightning datamodules for the benchmark datasets: noisy sine waves and wind-turbine power.

Every datamodule serves whole sequences as ``{"inputs": (B, L, d_in), "targets": (B, L, 1),
"index": (B,)}`` batches from checked train / valid / test splits.
"""

from datamodules.sinwave import SinwaveDataModule
from datamodules.weather import WeatherDataModule

__all__ = ["SinwaveDataModule", "WeatherDataModule"]
