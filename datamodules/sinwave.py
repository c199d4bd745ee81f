"""Noisy sine waves: generated from a seed, or loaded from prepared ``.npy`` files.

Recipe (shared/data/README.md): sequence j of L steps is
``x_i = sin(i / f_j + phi_j) + eps_j * N(0, 1)`` with ``f_j = 1 + 0.01 j``,
``phi_j ~ U[0, 2 pi)``, ``eps_j ~ U[0.08, 0.14]``; the sequences are shuffled and split
80 / 10 / 10 into train / valid / test (560 / 70 / 70 for the published 700).
Input and target are the same single channel. "sinwave-long" is this module with
``context_window=32``.
"""

from __future__ import annotations

import numpy as np

from datamodules.base import SequenceDataModule, default_input_columns
from datamodules.splits import SPLITS, SplitArray, load_split_files

MIN_SEQUENCES = 10  # the smallest count whose 80/10/10 split leaves every split non-empty


def generate_sinwave(rng: np.random.Generator, n_sequences: int, seq_len: int) -> np.ndarray:
    """Waves j = 0..n-1 in generation order, shape ``(n, L, 1)`` float64."""
    j = np.arange(n_sequences)
    frequency = 1.0 + 0.01 * j  # (n,)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=n_sequences)  # (n,)
    noise_scale = rng.uniform(0.08, 0.14, size=n_sequences)  # (n,)
    noise = rng.standard_normal((n_sequences, seq_len))  # (n, L)
    i = np.arange(seq_len)
    waves = np.sin(i[None, :] / frequency[:, None] + phase[:, None])  # (n, L)
    return (waves + noise_scale[:, None] * noise)[:, :, None]  # (n, L, 1)


def make_sinwave_splits(
    n_sequences: int = 700, seq_len: int = 500, seed: int = 0
) -> dict[str, np.ndarray]:
    """Generate the waves, shuffle them and cut them 80 / 10 / 10 into train / valid / test."""
    rng = np.random.default_rng(seed)
    waves = generate_sinwave(rng, n_sequences, seq_len)  # (n, L, 1)
    order = rng.permutation(n_sequences)
    n_train, n_valid = n_sequences * 8 // 10, n_sequences // 10
    bounds = {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, n_sequences),
    }
    return {split: waves[order[start:stop]] for split, (start, stop) in bounds.items()}


class SinwaveDataModule(SequenceDataModule):
    """Sine-wave forecasting: one channel is both input and target.

    Args:
        data_dir: folder with prepared ``train.npy`` / ``valid.npy`` / ``test.npy``
            (e.g. the published arrays); when None the data is generated from ``seed``.
        batch_size: sequences per batch.
        num_workers: dataloader worker processes.
        context_window: steps the model reads before predicting the next one.
        seed: generation seed (ignored when ``data_dir`` is given).
        n_sequences: sequences to generate (at least 10; ignored when ``data_dir`` is given).
        seq_len: steps per generated sequence (ignored when ``data_dir`` is given).
    """

    channels = ("x",)
    input_columns = default_input_columns(1)
    target_column = -1

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        context_window: int = 16,
        seed: int = 0,
        shuffle_eval: bool = False,
        n_sequences: int = 700,
        seq_len: int = 500,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, context_window=context_window,
            shuffle_eval=shuffle_eval,
        )
        if data_dir is None and n_sequences < MIN_SEQUENCES:
            raise ValueError(
                f"n_sequences={n_sequences} leaves an empty split; "
                f"generate at least {MIN_SEQUENCES}"
            )
        if data_dir is None and seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.save_hyperparameters(ignore=["_instantiator"])
        self.data_dir = data_dir
        self.seed = seed
        self.n_sequences = n_sequences
        self.seq_len = seq_len

    def load_splits(self) -> dict[str, SplitArray]:
        if self.data_dir is not None:
            return load_split_files(self.data_dir)
        splits = make_sinwave_splits(self.n_sequences, self.seq_len, self.seed)
        described = f"generated sinwave (seed={self.seed}, seq_len={self.seq_len})"
        return {split: SplitArray(f"{described} {split} split", splits[split]) for split in SPLITS}
