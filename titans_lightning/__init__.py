"""titans-lightning: test-time neural memory (Titans MAC) for forecasting, on PyTorch Lightning."""
from importlib.metadata import PackageNotFoundError, version

from .memory import NeuralMemory
from .model import MACLayer, MACTitan
from .module import TitansForecaster
from .strategy import CONTRACT, StrategyError, load_strategy

try:
    __version__ = version("titans-lightning")
except PackageNotFoundError:  # run from a checkout that was not installed
    __version__ = "0+unknown"

__all__ = ["NeuralMemory", "MACLayer", "MACTitan", "TitansForecaster", "CONTRACT", "StrategyError",
           "load_strategy"]
