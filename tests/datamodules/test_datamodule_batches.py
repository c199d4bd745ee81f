"""Batches: item format, input/target columns, shuffling of train and order of the rest."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import SinwaveDataModule, WeatherDataModule
from datamodules.splits import SPLITS


@pytest.fixture
def weather_dir(tmp_path, splits_writer):
    rng = np.random.default_rng(0)
    sizes = {"train": 9, "valid": 5, "test": 6}
    return splits_writer(
        tmp_path / "weather", {s: rng.normal(size=(n, 40, 6)) for s, n in sizes.items()}
    )


def small_sinwave(**kwargs) -> SinwaveDataModule:
    module = SinwaveDataModule(n_sequences=30, seq_len=40, **kwargs)
    module.setup()
    return module


def indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_sinwave_batch_is_a_dict_of_float32_sequences():
    batch = next(iter(small_sinwave(batch_size=4).train_dataloader()))
    assert set(batch) == {"inputs", "targets", "index"}
    assert batch["inputs"].shape == (4, 40, 1)
    assert batch["targets"].shape == (4, 40, 1)
    assert batch["inputs"].dtype == batch["targets"].dtype == torch.float32
    # One channel is both what the model reads and what it forecasts.
    torch.testing.assert_close(batch["inputs"], batch["targets"])


def test_weather_inputs_are_the_first_five_columns_and_target_the_last(weather_dir):
    module = WeatherDataModule(data_dir=str(weather_dir), batch_size=3)
    assert (module.input_dim, module.output_dim) == (5, 1)
    module.setup()
    batch = next(iter(module.test_dataloader()))
    expected = torch.from_numpy(
        np.load(weather_dir / "test.npy")[:3].astype(np.float32)
    )  # (3, L, 6)
    assert batch["inputs"].shape == (3, 40, 5)
    assert batch["targets"].shape == (3, 40, 1)
    torch.testing.assert_close(batch["inputs"], expected[:, :, :5])
    torch.testing.assert_close(batch["targets"], expected[:, :, 5:])


def test_train_loader_shuffles_reproducibly_under_the_global_seed():
    module = small_sinwave(batch_size=5)
    L.seed_everything(7)
    first = indices(module.train_dataloader())
    L.seed_everything(7)
    again = indices(module.train_dataloader())
    assert sorted(first) == list(range(24))
    assert first != list(range(24))
    assert first == again


def test_evaluation_loaders_keep_file_order_and_the_last_partial_batch(weather_dir):
    module = WeatherDataModule(data_dir=str(weather_dir), batch_size=4)
    module.setup()
    assert indices(module.val_dataloader()) == list(range(5))
    assert indices(module.test_dataloader()) == list(range(6))
    assert [len(b["index"]) for b in module.test_dataloader()] == [4, 2]
    assert len(indices(module.train_dataloader())) == 9  # drop_last=False


def test_predict_loader_serves_the_test_split_in_order():
    module = small_sinwave(batch_size=2)
    predicted = torch.cat([b["inputs"] for b in module.predict_dataloader()])
    tested = torch.cat([b["inputs"] for b in module.test_dataloader()])
    torch.testing.assert_close(predicted, tested)


def test_index_is_the_row_in_the_split_file(weather_dir):
    module = WeatherDataModule(data_dir=str(weather_dir))
    module.setup()
    item = module.datasets["valid"][3]
    assert item["index"] == 3
    expected = np.load(weather_dir / "valid.npy")[3, :, 5:].astype(np.float32)
    np.testing.assert_array_equal(item["targets"].numpy(), expected)


def test_loaders_before_setup_say_so():
    with pytest.raises(RuntimeError, match="call setup"):
        SinwaveDataModule().train_dataloader()


@pytest.mark.parametrize("split", SPLITS)
def test_every_split_has_a_dataset_after_setup(split):
    assert len(small_sinwave().datasets[split]) > 0


def test_shuffle_eval_reorders_validation_and_test_only_when_asked():
    import torch

    from datamodules import SinwaveDataModule

    for shuffle_eval, expect_sorted in ((False, True), (True, False)):
        dm = SinwaveDataModule(n_sequences=200, seq_len=20, context_window=4, batch_size=4,
                               shuffle_eval=shuffle_eval)
        dm.setup("fit")
        torch.manual_seed(0)
        order = torch.cat([b["index"] for b in dm.val_dataloader()])
        assert bool(torch.all(order[1:] > order[:-1])) is expect_sorted
