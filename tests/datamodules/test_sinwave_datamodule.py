"""Sinwave: generation follows the recipe and is seeded; the published arrays load exactly."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import SinwaveDataModule
from datamodules.sinwave import generate_sinwave, make_sinwave_splits
from datamodules.splits import SPLITS


def split_arrays(module: SinwaveDataModule) -> dict[str, np.ndarray]:
    module.setup()
    return {split: module.datasets[split].inputs.numpy() for split in SPLITS}


def test_generated_shapes_match_the_published_layout():
    arrays = split_arrays(SinwaveDataModule())
    assert {split: a.shape for split, a in arrays.items()} == {
        "train": (560, 500, 1),
        "valid": (70, 500, 1),
        "test": (70, 500, 1),
    }


def test_generation_is_deterministic_per_seed_and_differs_across_seeds():
    first = make_sinwave_splits(seed=3)
    again = make_sinwave_splits(seed=3)
    other = make_sinwave_splits(seed=4)
    for split in SPLITS:
        np.testing.assert_array_equal(first[split], again[split])
        assert not np.allclose(first[split], other[split])


def test_module_seed_selects_the_generated_data():
    a = split_arrays(SinwaveDataModule(seed=1, n_sequences=20, seq_len=40))
    b = split_arrays(SinwaveDataModule(seed=1, n_sequences=20, seq_len=40))
    c = split_arrays(SinwaveDataModule(seed=2, n_sequences=20, seq_len=40))
    np.testing.assert_array_equal(a["train"], b["train"])
    assert not np.allclose(a["train"], c["train"])


def test_splits_are_a_shuffled_partition_of_all_sequences():
    splits = make_sinwave_splits(n_sequences=50, seq_len=30, seed=0)
    waves = generate_sinwave(np.random.default_rng(0), 50, 30)
    assert [len(splits[s]) for s in SPLITS] == [40, 5, 5]
    rows = {waves[j].tobytes(): j for j in range(50)}
    order = [rows[row.tobytes()] for split in SPLITS for row in splits[split]]
    assert sorted(order) == list(range(50))
    assert order != list(range(50))


def test_each_wave_is_a_unit_sine_of_its_frequency_plus_recipe_noise():
    waves = generate_sinwave(np.random.default_rng(0), 100, 500)[:, :, 0]  # (n, L)
    i = np.arange(500)
    for j, wave in enumerate(waves):
        frequency = 1 + 0.01 * j
        basis = np.stack([np.sin(i / frequency), np.cos(i / frequency)], axis=1)  # (L, 2)
        coef, *_ = np.linalg.lstsq(basis, wave, rcond=None)
        residual = wave - basis @ coef
        assert np.hypot(*coef) == pytest.approx(1.0, abs=0.05)  # amplitude 1, any phase
        assert 0.07 < residual.std() < 0.15  # eps_j ~ U[0.08, 0.14]


def test_generated_statistics_match_the_published_arrays(shared_dir):
    published = np.concatenate([np.load(shared_dir("sinwave") / f"{s}.npy") for s in SPLITS])
    generated = np.concatenate(list(make_sinwave_splits(seed=0).values()))
    # Var = 1/2 (unit sine) + E[eps^2] (about 0.0125): std about 0.716 for both.
    assert generated.std() == pytest.approx(published.std(), abs=0.01)
    assert abs(generated.mean()) < 0.01


def test_loading_the_published_arrays_is_exact_in_float32(shared_dir):
    directory = shared_dir("sinwave")
    module = SinwaveDataModule(data_dir=str(directory))
    module.setup()
    for split in SPLITS:
        expected = np.load(directory / f"{split}.npy").astype(np.float32)
        np.testing.assert_array_equal(module.datasets[split].inputs.numpy(), expected)
        np.testing.assert_array_equal(module.datasets[split].targets.numpy(), expected)


def test_dimensions_are_known_before_setup():
    module = SinwaveDataModule()
    assert (module.input_dim, module.output_dim) == (1, 1)
    assert module.datasets == {}


def test_too_few_sequences_to_split_is_rejected():
    with pytest.raises(ValueError, match="n_sequences=5 leaves an empty split"):
        SinwaveDataModule(n_sequences=5)


def test_generated_sequences_shorter_than_the_context_are_rejected():
    module = SinwaveDataModule(n_sequences=10, seq_len=16, context_window=16)
    with pytest.raises(
        ValueError, match=r"generated sinwave .* 16 steps, fewer than context_window \+ 1"
    ):
        module.setup()
    assert module.datasets == {}


def test_sinwave_long_is_the_same_module_with_a_longer_context():
    module = SinwaveDataModule(context_window=32, n_sequences=10, seq_len=40)
    module.setup()
    assert module.context_window == 32
    assert module.hparams["context_window"] == 32
