"""titans-lightning: test-time neural memory (Titans MAC) for forecasting, on PyTorch Lightning."""
from .memory import NeuralMemory
from .model import MACLayer, MACTitan
from .module import TitansForecaster
from .strategy import CONTRACT, StrategyError, load_strategy

__all__ = ["NeuralMemory", "MACLayer", "MACTitan", "TitansForecaster", "CONTRACT", "StrategyError",
           "load_strategy"]
