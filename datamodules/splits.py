"""Train / valid / test arrays: loading them from ``.npy`` files and checking them.

Every datamodule hands its three splits through :func:`check_splits` before anything is kept, so
a bad file fails at ``setup`` with a message naming the file, the problem and the fix, instead of
as a shape error deep inside a training step.

Shapes: each split is ``(N, L, d)`` — N sequences of L steps with d channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

SPLITS: tuple[str, ...] = ("train", "valid", "test")


class SplitArray(NamedTuple):
    """One split's array and where it came from (a file path or a description, for messages)."""

    source: str
    array: np.ndarray  # (N, L, d)


def load_split_files(data_dir: str | Path) -> dict[str, SplitArray]:
    """Load ``train.npy``, ``valid.npy`` and ``test.npy`` from ``data_dir`` (unchecked)."""
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(directory)!r} does not exist or is not a directory; point data_dir at "
            f"a folder holding {', '.join(f'{s}.npy' for s in SPLITS)}"
        )
    splits = {}
    for split in SPLITS:
        path = directory / f"{split}.npy"
        if not path.is_file():
            names = ", ".join(f"{s}.npy" for s in SPLITS)
            raise FileNotFoundError(f"{path}: file not found; data_dir must hold {names}")
        splits[split] = SplitArray(str(path), _read_npy(path))
    return splits


def _read_npy(path: Path) -> np.ndarray:
    # allow_pickle stays off: a prepared split is plain numbers, and unpickling runs code.
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{path}: not a readable .npy array ({error}); re-create the file"
        ) from error


def check_splits(
    splits: dict[str, SplitArray], n_channels: int, context_window: int
) -> dict[str, np.ndarray]:
    """Check every split and return them as float32 arrays; ValueError at the first problem."""
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        raise ValueError(f"missing split(s) {missing}; expected {list(SPLITS)}")
    for split in SPLITS:
        _check_one(splits[split], n_channels, context_window)
    _check_consistent(splits)
    return {split: splits[split].array.astype(np.float32) for split in SPLITS}


def _check_one(split: SplitArray, n_channels: int, context_window: int) -> None:
    source, array = split
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{source}: dtype {array.dtype} is not a real number type; save floats")
    if array.ndim != 3:
        raise ValueError(
            f"{source}: array has shape {array.shape} (rank {array.ndim}) but must be 3-D "
            "(n_sequences, seq_len, d); window a long series into sequences first"
        )
    n_sequences, seq_len, d = array.shape
    if n_sequences == 0:
        raise ValueError(
            f"{source}: holds no sequences (shape {array.shape}); it needs at least one"
        )
    if d != n_channels:
        raise ValueError(
            f"{source}: has {d} channel(s) in its last axis but this dataset needs {n_channels}; "
            "check that data_dir points at the right dataset"
        )
    # The model reads context_window steps and predicts the next one, so a shorter sequence
    # yields no training pair at all.
    if seq_len < context_window + 1:
        raise ValueError(
            f"{source}: sequences have {seq_len} steps, fewer than context_window + 1 = "
            f"{context_window + 1}; lower context_window or use longer sequences"
        )
    n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise ValueError(
            f"{source}: contains {n_bad} NaN/inf value(s); remove or fill them and re-create "
            "the file"
        )
    # The model reads float32: a finite float64 beyond its range would become inf there.
    with np.errstate(over="ignore"):  # the overflow is what is being counted
        as_read = array.astype(np.float32)
    n_overflow = int(np.size(array) - np.count_nonzero(np.isfinite(as_read)))
    if n_overflow:
        raise ValueError(
            f"{source}: {n_overflow} value(s) exceed float32's range (|x| > "
            f"{np.finfo(np.float32).max:.3g}) and would become inf in the float32 the model "
            "reads; rescale the data (e.g. z-normalise it) and re-create the file"
        )


def _check_consistent(splits: dict[str, SplitArray]) -> None:
    # Sequence length and channel count must agree, or batches from different stages would not
    # fit the same model.
    shapes = {split: splits[split].array.shape[1:] for split in SPLITS}
    if len(set(shapes.values())) > 1:
        described = ", ".join(
            f"{splits[split].source}: (seq_len={shape[0]}, d={shape[1]})"
            for split, shape in shapes.items()
        )
        raise ValueError(
            f"splits disagree on (seq_len, d): {described}; re-create them with the same window "
            "length and columns"
        )
