"""ForecastFigure: one figure per validation epoch, drawn from the module's own predictions for
the chosen sequences; without matplotlib it warns once and logs nothing."""
from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from callbacks import ForecastFigure
from callbacks.forecast_figure import TAG


class PredictionRecorder(L.Callback):
    """Keeps ``(index, preds)`` of every validation batch of the last validation epoch."""

    def on_validation_epoch_start(self, trainer, pl_module):
        self.batches, self.latest = [], None
        self.hook = pl_module.model.register_forward_hook(
            lambda module, inputs, output: setattr(self, "latest", output[0].detach().clone()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args):
        self.batches.append((batch["index"].clone(), self.latest, batch["targets"].clone()))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.hook.remove()


def test_a_figure_per_validation_epoch_from_the_module_predictions(tmp_path, tiny_fit,
                                                                   read_events):
    figure, recorder = ForecastFigure(sequences=[1, 0]), PredictionRecorder()
    trainer = tiny_fit(tmp_path, [figure, recorder], max_epochs=2)

    images = read_events(trainer.log_dir).Images(TAG)
    assert [image.step for image in images] == [2, 4]
    assert all(image.width > 0 and image.height > 0 for image in images)
    assert figure._hook is None  # the model is no longer watched after validation
    assert figure._counts.tolist() == [1, 1]
    for j, sequence in enumerate([1, 0]):  # what was drawn is what the model predicted
        for index, preds, targets in recorder.batches:
            (row,) = (index == sequence).nonzero()[0]
            assert torch.equal(figure._sums[j, 0], preds[row, :, 0])
            assert torch.equal(figure._sums[j, 1], targets[row, :, 0])


def synthetic_batch(T: int = 12, C: int = 4):
    index = torch.tensor([5, 0, 3, 1])
    preds = torch.randn(4, T, 1)
    preds[0] = float("nan")  # a sequence not drawn must not spoil the others
    targets = torch.randn(4, T, 1)
    valid = torch.arange(T) >= C - 1
    return index, preds, targets, valid


def test_the_chosen_sequences_are_drawn_with_each_prediction_at_the_step_it_forecasts():
    index, preds, targets, valid = synthetic_batch()
    callback = ForecastFigure(sequences=[1, 0, 9], max_steps=10)
    callback.add(index, preds, targets, valid)
    assert callback._counts.tolist() == [1, 1, 0]

    figure = callback.draw(callback._sums, callback._counts.tolist(), valid)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["validation sequence 1", "validation sequence 0"]
    for ax, row in zip(axes, (3, 1)):
        target, prediction = ax.get_lines()
        assert target.get_xdata().tolist() == list(range(10))
        assert target.get_ydata().tolist() == pytest.approx(targets[row, :10, 0].tolist())
        assert prediction.get_xdata().tolist() == list(range(4, 10))  # made at t = 3..8
        assert prediction.get_ydata().tolist() == pytest.approx(preds[row, 3:9, 0].tolist())


def test_nothing_is_drawn_when_no_chosen_sequence_was_seen():
    index, preds, targets, valid = synthetic_batch()
    callback = ForecastFigure(sequences=[7])
    callback.add(index, preds, targets, valid)
    assert callback.draw(callback._sums, callback._counts.tolist(), valid) is None


@pytest.mark.parametrize("arguments", [{"sequences": []}, {"sequences": [-1]},
                                       {"max_steps": 1}])
def test_bad_arguments_are_rejected(arguments):
    with pytest.raises(ValueError, match="sequences|max_steps"):
        ForecastFigure(**arguments)


def test_without_matplotlib_it_warns_once_and_logs_nothing(tmp_path, tiny_fit, read_events,
                                                           monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    callback = ForecastFigure(sequences=[0])
    with pytest.warns(UserWarning) as caught:
        trainer = tiny_fit(tmp_path, [callback], max_epochs=2)
        trainer.validate(trainer.lightning_module, trainer.datamodule, verbose=False)

    assert sum("needs matplotlib" in str(w.message) for w in caught) == 1
    assert TAG not in read_events(trainer.log_dir).Tags()["images"]
    assert callback._sums is None
