"""Lightning callbacks that log the neural memory and the forecasts, and the run's CSV logger.

Chosen in YAML under ``trainer.callbacks``::

    - class_path: callbacks.SurpriseStatistics
    - class_path: callbacks.GateRate
    - class_path: callbacks.MemoryHealth
    - class_path: callbacks.MemoryProfile
    - class_path: callbacks.CustomScalars
    - class_path: callbacks.ForecastFigure
      init_args:
        sequences: [0, 1, 2]

Scalars go through Lightning's logging, to every logger of the run; figures, histograms and the
custom-scalars layout go to its TensorBoardLogger (each callback warns once, and draws nothing,
without one). Under DDP the memory statistics are gathered from every rank and written once, by
rank 0. :class:`RunCSVLogger` writes ``metrics.csv`` into the run folder, beside TensorBoard's.
"""
from callbacks.csv_logger import RunCSVLogger
from callbacks.custom_scalars import CustomScalars
from callbacks.forecast_figure import ForecastFigure
from callbacks.gate_rate import GateRate
from callbacks.memory_health import MemoryHealth
from callbacks.memory_profile import MemoryProfile
from callbacks.surprise_statistics import SurpriseStatistics

__all__ = ["CustomScalars", "ForecastFigure", "GateRate", "MemoryHealth", "MemoryProfile",
           "RunCSVLogger", "SurpriseStatistics"]
