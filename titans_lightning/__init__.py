"""titans-lightning: test-time neural memory (Titans MAC) for forecasting, on PyTorch Lightning.

The names below are imported on first use, so that a light submodule (``titans_lightning.sampling``,
used by the datamodules) does not load the memory, the model and Lightning's module with it.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("titans-lightning")
except PackageNotFoundError:  # run from a checkout that was not installed
    __version__ = "0+unknown"

_HOMES = {"NeuralMemory": "memory", "MACLayer": "model", "MACTitan": "model",
          "TitansForecaster": "module", "CONTRACT": "contract", "StrategyError": "contract",
          "load_strategy": "strategy"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
