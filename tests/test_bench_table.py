"""The benchmark table from record files: mean ± sample std and count per cell, results.csv and
screening.csv one row per record, screening records kept apart, misfiled records refused."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from titans_lightning import bench_table


def record(benchmark="sinwave", strategy="titans_default", seed=0, test_mse=0.02, **changes):
    base = {"benchmark": benchmark, "strategy": strategy, "strategy_options": {},
            "memory_scope": "shared", "mac_order": "reference", "protocol": "default",
            "seed": seed, "status": "ok", "val_mse": test_mse and test_mse + 0.001,
            "test_mse": test_mse, "test_mae": 0.1, "best_epoch": 10 + seed, "wall_s": 600.0 + seed, "fit_wall_s": 590.0,
            "attempts": [{"exit": 0, "wall_s": 600.0 + seed}], "threads": 1, "device": "cpu",
            "commit": "abc123", "label": None, "extra_args": [], "config": {"big": "dict"}}
    return {**base, **changes}


def write(folder: Path, name: str, content: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(content))


def our_runs(table: str) -> str:
    return table.split("## Our runs")[1].split("## Published")[0]


def test_cells_are_mean_sample_std_and_count_over_seeds(tmp_path):
    for seed, mse in ((0, 0.02), (1, 0.03), (2, 0.04)):
        write(tmp_path / "results", f"w{seed}", record(
            "weather", "meta_nlms", seed, mse, strategy_options={"theta": 0.5},
            memory_scope="per_sequence", mac_order="causal"))
    write(tmp_path / "results", "s0", record("sinwave", "meta_nlms", 0, 0.0161,
                                             strategy_options={"theta": 0.5},
                                             memory_scope="per_sequence", mac_order="causal"))
    write(tmp_path / "results", "base", record("sinwave", seed=0, test_mse=0.0184))
    table = our_runs(bench_table.render(tmp_path).read_text())
    assert "| meta_nlms (theta=0.5) | per_sequence | causal | default | 0.0161 (1 seed) | " \
           "0.0300 ± 0.0100 (3 seeds) | — |" in table
    assert "| titans_default | shared | reference | default | 0.0184 (1 seed) | — | — |" \
        in table
    assert table.index("meta_nlms") < table.index("titans_default")  # rows sorted


def test_results_csv_has_one_row_per_record_with_its_columns(tmp_path):
    write(tmp_path / "results", "a", record(seed=0, test_mse=0.02))
    write(tmp_path / "results", "b", record(seed=1, test_mse=0.03, strategy_options={"clip": 2},
                                            mac_order="causal", device="cuda:0 (H200)"))
    bench_table.render(tmp_path)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert tuple(frame.columns) == bench_table.COLUMNS
    for column in ("benchmark", "strategy", "options", "scope", "order", "protocol", "seed",
                   "val_mse", "test_mse", "best_epoch", "wall_s", "commit", "device"):
        assert column in frame.columns
    a, b = frame.sort_values("seed").to_dict("records")
    assert (a["record"], a["options"], a["order"], a["test_mse"]) == ("a", "{}", "reference", 0.02)
    assert (b["options"], b["order"], b["device"], b["best_epoch"]) == \
        ('{"clip": 2}', "causal", "cuda:0 (H200)", 11)
    assert (b["wall_s"], b["attempts"]) == (601.0, 1)
    assert pd.isna(b["label"]) and pd.isna(b["extra_args"])  # a full-protocol run: neither
    assert math.isclose(b["val_mse"], 0.031)
    means = frame.groupby("benchmark").test_mse.mean()  # loads straight into pandas
    assert means["sinwave"] == pytest.approx(0.025)


def test_screening_records_are_tabled_per_label_never_in_the_main_table(tmp_path):
    write(tmp_path / "results", "full", record(test_mse=0.0184))
    narrow = ["--model.dim_feedforward=64", "--trainer.max_epochs=20"]
    for seed, mse in ((0, 0.0160), (1, 0.0170)):
        write(tmp_path / "screening" / "ff64", f"m{seed}", record(
            strategy="multi_step", seed=seed, test_mse=mse, memory_scope="per_sequence",
            mac_order="causal", label="ff64", extra_args=narrow, best_epoch=16 + seed,
            wall_s=1500.0))
    write(tmp_path / "screening" / "e6", "t0", record(test_mse=0.0205, label="e6",
                                                      extra_args=["--trainer.max_epochs=6"]))
    text = bench_table.render(tmp_path).read_text()
    main = our_runs(text)
    assert "multi_step" not in main and "0.0205" not in main
    assert "| titans_default | shared | reference | default | 0.0184 (1 seed) | — | — |" in main
    screening = text.split("## Screening runs")[1]
    e6, ff64 = screening.split("### `e6`")[1].split("### `ff64`")
    assert "Extra `titans fit` arguments: `--model.dim_feedforward=64 --trainer.max_epochs=20`" \
        in ff64
    assert "| sinwave | multi_step | per_sequence | causal | default | 0 1 | 16-17 | " \
           "0.0175 ± 0.0007 | 0.0165 ± 0.0007 | 25 min |" in ff64
    assert "multi_step" not in e6 and "| 0 | 10 | 0.0215 | 0.0205 | 10 min |" in e6
    frame = pd.read_csv(tmp_path / "screening.csv")
    assert sorted(frame.label) == ["e6", "ff64", "ff64"]
    assert set(frame.extra_args) == {" ".join(narrow), "--trainer.max_epochs=6"}
    assert list(pd.read_csv(tmp_path / "results.csv").record) == ["full"]


def test_a_label_with_several_settings_shows_them_per_row(tmp_path):
    write(tmp_path / "screening" / "mixed", "a", record(label="mixed", extra_args=["--x=1"]))
    write(tmp_path / "screening" / "mixed", "b", record(label="mixed", extra_args=["--x=2"],
                                                        strategy="delta_energy"))
    screening = bench_table.render(tmp_path).read_text().split("### `mixed`")[1]
    assert "extra arguments" in screening and "`--x=1`" in screening and "`--x=2`" in screening


@pytest.mark.parametrize("misfiled, why", [
    ({"label": "ff64", "extra_args": ["--model.dim_feedforward=64"]}, "changed the protocol"),
    ({"extra_args": ["--trainer.max_epochs=2"]}, "changed the protocol"),
    ({"status": "nonfinite", "test_mse": None}, "did not finish"),
])
def test_a_record_that_cannot_count_is_refused_by_name(tmp_path, misfiled, why):
    write(tmp_path / "results", "good", record())
    write(tmp_path / "results", "bad_one", record(seed=1, **misfiled))
    with pytest.raises(ValueError, match=f"bad_one {why}"):
        bench_table.render(tmp_path)
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_record_cut_short_is_named_and_nothing_is_written(tmp_path):
    write(tmp_path / "results", "good", record())
    (tmp_path / "results" / "cut.json").write_text(json.dumps(record(seed=1))[:40])
    with pytest.raises(ValueError, match=r"cut\.json is not valid JSON .*move it away"):
        bench_table.render(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_the_published_table_research_notes_and_an_empty_folder(tmp_path):
    (tmp_path / "research.md").write_text("## What was tried\n\nnotes\n")
    text = bench_table.render(tmp_path).read_text()
    assert "(no finished run yet)" in our_runs(text)
    published = text.split("## Published")[1]
    assert "| titans_default | 0.019 | 0.051 | 0.032 |" in published
    assert "| oracle (sine family) | 0.0135 | — | 0.0133 |" in published
    assert "## Screening runs" not in text and text.endswith("## What was tried\n\nnotes\n")
    assert pd.read_csv(tmp_path / "results.csv").columns.tolist() == list(bench_table.COLUMNS)
    assert pd.read_csv(tmp_path / "screening.csv").empty


def test_older_records_without_newer_fields_still_table(tmp_path):
    old = record(test_mse=0.0181)
    for key in ("mac_order", "label", "fit_wall_s", "threads", "status"):
        old.pop(key)
    write(tmp_path / "results", "old", old)
    assert "| titans_default | shared | reference | default | 0.0181 (1 seed) |" in \
        our_runs(bench_table.render(tmp_path).read_text())
