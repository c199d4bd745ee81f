"""CustomScalars: the layout is written once per run, and its charts gather the tags the other
callbacks log: every memory layer on one chart per statistic and split, the profiles as bands."""
from __future__ import annotations

import re

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util

from callbacks.custom_scalars import layout

SPLITS = ("train", "val", "test")


def read_layout(events) -> layout_pb2.Layout:
    (event,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)  # once, though it fitted and tested
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


@pytest.fixture(scope="module")
def written(logged_run, read_events):
    _, _, folder = logged_run
    events = read_events(folder)
    return read_layout(events), set(events.Tags()["scalars"])


def charts(written_layout) -> dict[str, dict[str, object]]:
    return {category.title: {chart.title: chart for chart in category.chart}
            for category in written_layout.category}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("category, chart, tags", [
    ("memory surprise", "mean surprise, {split}", "memory/layer{i}/surprise/{split}/mean"),
    ("memory gate rate", "gate rate, {split}", "memory/layer{i}/gate_rate/{split}"),
    ("memory update norm", "mean update norm, {split}", "memory/layer{i}/update_norm/{split}")])
def test_each_statistic_has_one_chart_per_split_with_every_layer(written, split, category,
                                                                 chart, tags):
    written_layout, scalars = written
    (regex,) = charts(written_layout)[category][chart.format(split=split)].multiline.tag
    matched = sorted(tag for tag in scalars if re.search(regex, tag))
    assert matched == [tags.format(i=i, split=split) for i in (0, 1)]


def test_the_forecast_chart_holds_loss_and_mse(written):
    written_layout, scalars = written
    (regex,) = charts(written_layout)["forecast"]["train/loss, val/mse and test/mse"] \
        .multiline.tag
    assert sorted(t for t in scalars if re.search(regex, t)) == ["test/mse", "train/loss",
                                                                  "val/mse"]


def test_the_profile_bands_name_tags_that_were_logged(written):
    written_layout, scalars = written
    bands = charts(written_layout)["memory over the sequence (step = update u)"]
    assert len(bands) == 2 * 3 * 3  # layers x splits x statistics
    for chart in bands.values():
        (series,) = chart.margin.series
        assert {series.value, series.lower, series.upper} <= scalars
    (series,) = bands["layer 1 gate_rate, val"].margin.series
    assert (series.value, series.lower, series.upper) == (
        "memory/layer1/profile/gate_rate/val/mean", "memory/layer1/profile/gate_rate/val/p10",
        "memory/layer1/profile/gate_rate/val/p90")


def test_without_a_profile_callback_there_are_no_bands():
    assert "memory over the sequence (step = update u)" not in layout(2, profiles=False)
    assert len(layout(3, profiles=True)["memory over the sequence (step = update u)"]) == 27
