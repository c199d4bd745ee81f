"""titans-bench: tiny runs end to end (screening label, resume after a SIGKILL, failures), from
another working directory, and where the configs and arrays are found. The table itself:
test_bench_table.py."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from titans_lightning import bench

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CHECKPOINTS_ONLY = json.dumps([{  # the shipped configs' checkpoint callback, no figures
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"monitor": "val/mse", "mode": "min", "save_top_k": 1, "save_last": True}}])
TINY = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--model.dim_feedforward=8",
        f"--trainer.callbacks={CHECKPOINTS_ONLY}"]
needs_arrays = pytest.mark.skipif(not (SHARED / "sinwave").is_dir(),
                                  reason="published arrays not found")


def bench_args(out: Path, *extra: str, seed: int | tuple[int, ...] = 3) -> list[str]:
    seeds = [str(s) for s in (seed if isinstance(seed, tuple) else (seed,))]
    return ["--strategies", "titans_default", "--benchmarks", "sinwave", "--seeds", *seeds,
            "--threads", "1", "--accelerator", "cpu", "--out", str(out), "--label", "tiny",
            "--", *TINY, *extra]


@needs_arrays
def test_a_screening_run_writes_its_record_apart_skips_when_done_and_renders(tmp_path, capsys,
                                                                            monkeypatch):
    elsewhere = tmp_path / "elsewhere"  # nothing may depend on the working directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = bench_args(tmp_path, "--trainer.max_epochs=2")
    bench.main(argv)
    name = "sinwave__titans_default__shared__reference-order__default-protocol__seed3"
    record = json.loads((tmp_path / "screening" / "tiny" / f"{name}.json").read_text())
    assert not (tmp_path / "results").exists()  # never among the full-protocol records
    for key in ("strategy", "benchmark", "memory_scope", "mac_order", "protocol", "seed",
                "best_epoch", "val_mse", "test_mse", "wall_s", "device", "commit", "config",
                "fit_args", "extra_args", "attempts", "label", "status"):
        assert key in record, key
    assert record["status"] == "ok" and record["label"] == "tiny"
    assert record["seed"] == 3 and record["config"]["seed_everything"] == 3
    assert record["config"]["data"]["init_args"]["data_dir"] == str(SHARED.resolve() / "sinwave")
    loggers = record["config"]["trainer"]["logger"]  # the base config's, named after sinwave.yaml
    assert {(lg["init_args"]["save_dir"], lg["init_args"]["name"]) for lg in loggers} == \
        {(str(tmp_path / "runs" / "tiny" / name), "sinwave")}
    assert record["fit_args"][1:3] == ["--config", str(REPO / "configs" / "sinwave.yaml")]
    assert record["fit_args"][0] == "fit" and record["fit_args"][-len(TINY) - 1:-1] == TINY
    assert record["extra_args"] == [*TINY, "--trainer.max_epochs=2"]
    assert [a["exit"] for a in record["attempts"]] == [0]
    assert 0 < record["test_mse"] < 10
    out = capsys.readouterr().out
    assert f"{name}: epoch 0/1" in out and "ETA" in out  # progress, a line per epoch
    bench.main(argv)
    assert "done already" in capsys.readouterr().out
    table = (tmp_path / "RESULTS.md").read_text()
    ours = table.split("## Our runs")[1].split("## Published")[0]
    assert "(no finished run yet)" in ours
    assert f"{record['test_mse']:.4f}" in table.split("## Screening runs")[1]
    assert "| titans_default | 0.019 | 0.051 | 0.032 |" in table
    assert pd.read_csv(tmp_path / "results.csv").empty
    (row,) = pd.read_csv(tmp_path / "screening.csv").to_dict("records")
    assert (row["record"], row["label"], row["seed"]) == (name, "tiny", 3)
    assert row["test_mse"] == pytest.approx(record["test_mse"])
    assert list(elsewhere.iterdir()) == []


@needs_arrays
def test_a_run_killed_mid_epoch_resumes_in_its_folder_and_counts_both_attempts(tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # for tests.kill_switch: runs work in their folder
    straight_out = tmp_path / "straight"
    bench.main(bench_args(straight_out, "--trainer.max_epochs=3"))
    kill = json.dumps({"class_path": "tests.kill_switch.KillAt",
                       "init_args": {"step": 3, "once": str(tmp_path / "killed")}})
    argv = bench_args(tmp_path / "killed_run", "--trainer.max_epochs=3",
                      f"--trainer.callbacks+={kill}")
    with pytest.raises(SystemExit) as failed:  # the first attempt is killed: exit 1
        bench.main(argv)
    assert failed.value.code == 1
    assert "FAILED (exit -9)" in capsys.readouterr().out
    bench.main(argv)
    (straight,) = (straight_out / "screening" / "tiny").glob("*.json")
    (killed,) = (tmp_path / "killed_run" / "screening" / "tiny").glob("*.json")
    straight, killed = json.loads(straight.read_text()), json.loads(killed.read_text())
    assert [a["exit"] for a in killed["attempts"]] == [-9, 0]
    run = "version_0-titans_default-shared-reference-seed3"
    assert killed["attempts"][1]["resumed_from"].endswith(f"{run}/checkpoints/last.ckpt")
    runs = list((tmp_path / "killed_run" / "runs").glob("tiny/*/sinwave/version_*"))
    assert [p.name for p in runs] == [run]
    assert killed["wall_s"] == pytest.approx(sum(a["wall_s"] for a in killed["attempts"]), abs=0.2)
    for key in ("best_epoch", "val_mse", "test_mse"):
        assert killed[key] == pytest.approx(straight[key], rel=1e-6), key


def test_extra_fit_arguments_need_a_label(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--", "--trainer.max_epochs=2"])
    assert "give them a --label" in capsys.readouterr().err


def test_a_runner_owned_argument_is_refused_as_such_even_without_a_label(tmp_path, capsys):
    """The label error would send the user to add one, only to be refused again."""
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--", "--ckpt_path=last.ckpt"])
    err = capsys.readouterr().err
    assert "--ckpt_path=last.ckpt (set by the runner" in err and "give them a --label" not in err


@needs_arrays
def test_a_failed_run_makes_the_runner_exit_non_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        bench.main(bench_args(tmp_path, "--trainer.max_epochs=1", "--model.nhead=3"))
    assert failed.value.code == 1
    out = capsys.readouterr().out
    assert "FAILED (exit 1)" in out and "1 failed" in out
    assert not list(tmp_path.glob("screening/tiny/*.json"))


def test_run_names_say_everything_that_tells_runs_apart():
    name = bench.run_name("sinwave", "meta_nlms", "per_sequence", "causal", "default", 2,
                          {"theta": 0.5, "clip": 1e9})
    assert name == ("sinwave__meta_nlms+clip1000000000.0_theta0.5__per_sequence__causal-order__"
                    "default-protocol__seed2")


def test_resume_picks_the_newest_last_checkpoint(tmp_path):
    import os
    import time

    old = tmp_path / "sinwave" / "version_0" / "checkpoints" / "last.ckpt"  # named the old way
    new = tmp_path / "sinwave" / "version_1-titans_default-shared-reference-seed0" / \
        "checkpoints" / "last.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_text("x")
        os.utime(path, (time.time() + i, time.time() + i))
    assert bench.latest_checkpoint(tmp_path) == new
    assert bench.latest_checkpoint(tmp_path / "nothing") is None


def test_concurrent_runs_share_the_cores():
    assert bench.threads_per_run(1, cores=8) == 8
    assert bench.threads_per_run(2, cores=8) == 4
    assert bench.threads_per_run(3, cores=2) == 1


def test_names_of_options_and_strategy_files_never_collide_nor_nest(tmp_path):
    a = bench.run_name("sinwave", "titans_default", "shared", "causal", "default", 0, {"a": [1, 2]})
    b = bench.run_name("sinwave", "titans_default", "shared", "causal", "default", 0, {"a": 12})
    assert a != b
    rule = bench.run_name("sinwave", str(tmp_path / "rules" / "mine.py"), "shared", "causal",
                          "default", 0)
    assert "/" not in rule and rule.startswith("sinwave__mine-")


def test_a_relative_out_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = bench.parse_args(["--out", "campaign", "--strategies", "rules/mine.py", "--render"])
    assert args.out == tmp_path / "campaign"
    assert args.strategies == [str(tmp_path / "rules" / "mine.py")]


def test_by_default_nothing_tracked_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.parse_args(["--render"]).out == tmp_path / "titans-bench"
    assert bench.parse_args(["--out", "benchmarks", "--render"]).out == tmp_path / "benchmarks"


def fake_checkout(root: Path, benchmarks=("sinwave",)) -> None:
    """configs/ and data/ as a user of an installed package might keep them, in ``root``."""
    (root / "configs").mkdir(parents=True)
    for b in benchmarks:
        config, arrays = bench.BENCHMARKS[b]
        shutil.copy(REPO / "configs" / config, root / "configs" / config)
        (root / "data" / arrays).mkdir(parents=True, exist_ok=True)
        for name in bench.ARRAYS:
            (root / "data" / arrays / name).write_bytes(b"")


def test_an_editable_install_finds_its_configs_and_arrays_from_any_folder(tmp_path, monkeypatch):
    if not (SHARED / "sinwave").is_dir():
        pytest.skip("published arrays not found")
    monkeypatch.chdir(tmp_path)
    assert bench.editable_source() == REPO  # this checkout is installed editable
    args = bench.parse_args(["--benchmarks", "sinwave", "--seeds", "0"])
    assert args.configs == REPO / "configs" and args.data_root == SHARED.resolve()
    argv = bench.fit_arguments(args, "sinwave", "titans_default", 0, tmp_path / "run")
    assert argv[1:3] == ["--config", str(REPO / "configs" / "sinwave.yaml")]
    assert f"--data.init_args.data_dir={SHARED.resolve() / 'sinwave'}" in argv


def test_without_a_checkout_the_working_directory_or_the_options_say_where(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(bench, "editable_source", lambda: None)  # a regular install
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        bench.parse_args(["--benchmarks", "sinwave"])
    err = capsys.readouterr().err
    assert "no folder with the benchmark configs for sinwave" in err
    assert str(tmp_path / "configs") in err and "Pass --configs DIR" in err

    fake_checkout(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    args = bench.parse_args(["--benchmarks", "sinwave"])
    assert (args.configs, args.data_root) == (tmp_path / "work" / "configs",
                                             tmp_path / "work" / "data")
    with pytest.raises(SystemExit):  # weather's config and arrays are not there
        bench.parse_args(["--benchmarks", "sinwave", "weather"])
    assert "no folder with the benchmark configs for sinwave, weather" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)  # explicit folders, relative to where the command runs
    args = bench.parse_args(["--benchmarks", "sinwave", "--configs", "work/configs",
                             "--data-root", "work/data"])
    assert (args.configs, args.data_root) == (tmp_path / "work" / "configs",
                                             tmp_path / "work" / "data")
    with pytest.raises(SystemExit):  # an explicit folder without the arrays is not passed over
        bench.parse_args(["--benchmarks", "sinwave", "--configs", "work/configs",
                          "--data-root", "work"])
    err = capsys.readouterr().err
    assert f"tried {tmp_path / 'work'}. Pass --data-root DIR" in err


def test_render_needs_no_configs_nor_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "editable_source", lambda: None)
    monkeypatch.chdir(tmp_path)
    bench.main(["--out", "table", "--render"])
    assert (tmp_path / "table" / "RESULTS.md").is_file()
    assert (tmp_path / "table" / "results.csv").is_file()


def test_help_describes_every_option():
    parser = bench.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 20 or action.dest == "help", action.dest
    text = parser.format_help()
    for option in ("--configs", "--data-root", "--out", "--render", "--label"):
        assert option in text.split("options:")[1], option
    assert "default: ./titans-bench" in text and "results.csv" in text


def test_a_label_reused_with_other_extra_arguments_fails_and_keeps_what_is_there(tmp_path,
                                                                                 monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(bench, "editable_source", lambda: None)
    fake_checkout(tmp_path)  # nothing runs: the refusal comes first
    monkeypatch.chdir(tmp_path)
    name = "sinwave__titans_default__shared__reference-order__default-protocol__seed3"
    record = tmp_path / "screening" / "tiny" / f"{name}.json"
    record.parent.mkdir(parents=True)
    (real,) = (REPO / "benchmarks" / "screening" / "ff64-e20").glob(
        "sinwave__titans_default__shared__causal-order__*seed0.json")
    earlier = {**json.loads(real.read_text()), "extra_args": [*TINY, "--trainer.max_epochs=2"]}
    record.write_text(json.dumps(earlier))
    started = tmp_path / "runs" / "tiny" / name.replace("seed3", "seed4")  # cut off, no record
    started.mkdir(parents=True)
    (started / "extra_args.json").write_text(json.dumps([*TINY, "--trainer.max_epochs=2"]))
    for seed, made in ((3, record), (4, started)):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as failed:
            bench.main(bench_args(tmp_path, "--trainer.max_epochs=5", seed=seed))
        assert failed.value.code == 1
        out = capsys.readouterr().out
        assert "FAILED (made with other extra arguments)" in out and str(made) in out
        assert "give these runs another --label" in out and "done already" not in out
        tables = (".md", ".csv")  # rewritten after every campaign
        assert {p: p.read_bytes() for p in tmp_path.rglob("*")
                if p.is_file() and p.suffix not in tables} == \
            {p: b for p, b in before.items() if p.suffix not in tables}


@pytest.mark.parametrize("owned, instead", [
    ("--trainer.logger.init_args.version=mine", "the runner"),
    ("--trainer.logger.init_args.save_dir=/tmp/x", "the runner"),
    ("--trainer.logger=false", "the runner"), ("--ckpt_path=last.ckpt", "the runner"),
    ("--seed_everything=1", "--seeds"), ("--model.strategy=adam_gated", "--strategies"),
    ('--model.strategy_options={"theta": 2}', "--options"),
    ("--model.memory_scope=per_sequence", "--scope"), ("--model.mac_order", "--order"),
    ("--model.eval_protocol=reference", "--protocol"),
    ("--data.init_args.data_dir=/elsewhere", "--data-root"),
    ("--data.data_dir=/elsewhere", "--data-root"),
    ("--data.init_args.shuffle_eval=true", "--protocol"),
    ("--data=datamodules.WeatherDataModule", "--benchmarks"),
    ("--config=other.yaml", "--benchmarks"), ("--trainer.accelerator=gpu", "--accelerator"),
    ('--model={"strategy": "adam_gated"}', "--strategies")])
def test_fit_arguments_the_runner_sets_itself_are_refused(tmp_path, capsys, owned, instead):
    """Else a record's name and fields could say one setting while the run used another."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path), "--label", "x", "--render", "--", owned,
                          "--model.dim_feedforward=64"])
    err = capsys.readouterr().err
    assert "titans-bench sets these `titans fit` arguments itself" in err
    assert f"{owned} (set by {instead}" in err and "dim_feedforward" not in err


def test_other_fit_arguments_pass_as_they_are(tmp_path):
    extra = ["--model.dim_feedforward=64", "--trainer.max_epochs", "5",
             "--data.init_args.batch_size=8", "--model.memory_layers=3"]
    args = bench.parse_args(["--out", str(tmp_path), "--label", "x", "--render", "--", *extra])
    assert args.extra == extra


def test_a_record_cut_short_fails_its_run_alone_and_is_left_as_it_is(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(bench, "editable_source", lambda: None)
    fake_checkout(tmp_path)  # nothing runs: both records exist
    monkeypatch.chdir(tmp_path)
    (real,) = (REPO / "benchmarks" / "screening" / "ff64-e20").glob(
        "sinwave__titans_default__shared__causal-order__*seed0.json")
    name = "sinwave__titans_default__shared__reference-order__default-protocol__seed{}"
    folder = tmp_path / "screening" / "tiny"
    folder.mkdir(parents=True)
    whole = json.dumps({**json.loads(real.read_text()), "extra_args": TINY})
    (folder / f"{name.format(3)}.json").write_text(whole[:len(whole) // 2])  # a write cut off
    (folder / f"{name.format(4)}.json").write_text(whole)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as failed:
        bench.main(bench_args(tmp_path, seed=(3, 4)))
    assert failed.value.code == 1
    captured = capsys.readouterr()
    cut = folder / f"{name.format(3)}.json"
    assert f"{name.format(3)}: FAILED ({cut} is not valid JSON" in captured.out
    assert f"{name.format(4)}: done already" in captured.out and "1 failed" in captured.out
    assert f"RESULTS.md not written: {cut} is not valid JSON" in captured.err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_error_in_one_run_fails_it_and_the_campaign_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "editable_source", lambda: None)
    fake_checkout(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []

    def run_one(args, benchmark, strategy, seed):
        ran.append(seed)
        if seed == 3:
            raise OSError(28, "No space left on device")
        return "skipped"

    monkeypatch.setattr(bench, "run_one", run_one)
    with pytest.raises(SystemExit) as failed:
        bench.main(bench_args(tmp_path, seed=(3, 4)))
    assert failed.value.code == 1 and sorted(ran) == [3, 4]
    out = capsys.readouterr().out
    assert "seed3: FAILED (OSError: [Errno 28] No space left on device)" in out
    assert "2 runs: 0 finished, 1 done before, 1 failed" in out
