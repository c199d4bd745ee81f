"""Lightning callbacks that log the neural memory and the forecasts to TensorBoard.

Chosen in YAML under ``trainer.callbacks``::

    - class_path: callbacks.SurpriseStatistics
    - class_path: callbacks.GateRate
    - class_path: callbacks.MemoryHealth
    - class_path: callbacks.ForecastFigure
      init_args:
        sequences: [0, 1, 2]

Each writes through the run's TensorBoardLogger (and warns once, doing nothing, without one).
Under DDP the memory statistics are gathered from every rank and written once, by rank 0.
"""
from callbacks.forecast_figure import ForecastFigure
from callbacks.gate_rate import GateRate
from callbacks.memory_health import MemoryHealth
from callbacks.surprise_statistics import SurpriseStatistics

__all__ = ["ForecastFigure", "GateRate", "MemoryHealth", "SurpriseStatistics"]
