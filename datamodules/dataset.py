"""A map-style dataset of whole sequences, split into model inputs and the forecast target.

Item: ``{"inputs": (L, d_in) float32, "targets": (L, 1) float32, "index": int}`` where ``index``
is the sequence's row in its split, so predictions can be matched back to the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class SequenceDataset(Dataset):
    """Sequences ``(N, L, d)``; inputs are ``input_columns``, the target is ``target_column``."""

    def __init__(self, array: np.ndarray, input_columns: Sequence[int], target_column: int) -> None:
        values = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))  # (N, L, d)
        # Slice once here so __getitem__ only indexes; columns are copied so items never alias
        # one another through a shared view.
        self.inputs = values[:, :, list(input_columns)].contiguous()  # (N, L, d_in)
        self.targets = values[:, :, [target_column]].contiguous()  # (N, L, 1)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"inputs": self.inputs[index], "targets": self.targets[index], "index": int(index)}
