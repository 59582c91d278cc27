"""The eos command line through typer's CliRunner, on tiny data, into tmp_path."""

import json

import pytest
from typer.testing import CliRunner

from eos_toolkit.record import read_run
from experiments.cli import app

runner = CliRunner()
TINY = ["--data", "fashion-mnist", "--n-train", "100", "--track-every", "5", "--device", "cpu",
        "--set", "model_options={\"hidden\": [12]}", "--set", "chunk_size=64"]


def eos(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_writes_a_record_that_pandas_reads(tiny_data_dir, tmp_path):
    result = eos("run", "eos-fullbatch", "--optimizer", "vradam", "--lr", "0.01", "--beta3", "2", "--steps", "10",
                 "--data-dir", tiny_data_dir, "--out", tmp_path, "--name", "r1", *TINY)
    assert result.exit_code == 0, result.output
    assert "finished at step 10" in result.output
    run = read_run(tmp_path / "r1")
    assert run.config["optimizer"] == "vradam" and run.config["beta3"] == 2.0 and run.config["steps"] == 10
    assert {"train_loss", "sharpness", "precond_sharpness", "eta", "vr_sq_norm"} <= set(run.metrics.metric)

    listed = eos("runs", "list", tmp_path)
    assert listed.exit_code == 0 and "r1" in listed.output and "finished" in listed.output


def test_config_file_with_cli_override(tiny_data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer: adam\nlr: 0.002\nsteps: 5\n")
    result = eos("run", "eos-fullbatch", "--config", cfg, "--lr", "0.004", "--data-dir", tiny_data_dir,
                 "--out", tmp_path, "--name", "r", *TINY)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["optimizer"], config["lr"], config["steps"]) == ("adam", 0.004, 5)


def test_resume_command_finishes_a_killed_run(tiny_data_dir, tmp_path):
    from experiments.config import RunConfig
    from experiments.train import train

    class Kill(BaseException):
        pass

    def kill(step, total):
        if step == 7:
            raise Kill()

    cfg = RunConfig(dataset="fashion-mnist", data_dir=str(tiny_data_dir), n_train=100, steps=10, track_every=5,
                    model_options={"hidden": [12]}, device="cpu")
    with pytest.raises(Kill):
        train(cfg, tmp_path / "k", on_step=kill)
    result = eos("resume", tmp_path / "k")
    assert result.exit_code == 0, result.output
    assert read_run(tmp_path / "k").status == "finished"


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown task 'nope'"),
    (["run", "eos-fullbatch", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["run", "eos-fullbatch", "--steps", "-3"], "steps must be an integer > 0, got -3"),
    (["run", "eos-fullbatch", "--set", "schedule=Bogus"], "unknown schedule 'Bogus'"),
    (["run", "eos-fullbatch", "--set", "volume=11"], "unknown config key(s) ['volume']"),
    (["run", "eos-fullbatch", "--config", "/nonexistent/c.json"], "cannot read config file"),
    (["run", "eos-fullbatch", "--data", "cifar10"], "eos data fetch cifar10"),
    (["resume", "/nonexistent/run"], "not a run record"),
    (["plot", "/nonexistent/run", "--kind", "bogus"], "unknown --kind 'bogus'"),
])
def test_bad_arguments_exit_with_one_clear_line(tiny_data_dir, tmp_path, args, message):
    result = runner.invoke(app, args + ["--out", str(tmp_path)] if args[0] == "run" else args,
                           env={"EOS_DATA_DIR": str(tiny_data_dir)})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert message in result.output


def test_non_numeric_lr_is_a_usage_error():
    result = eos("run", "eos-fullbatch", "--lr", "fast")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Invalid value for '--lr'" in result.output


def test_data_list_shows_what_is_here(tiny_data_dir):
    result = eos("data", "list", "--data-dir", tiny_data_dir)
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 3}
    assert "yes" in lines["fashion-mnist"] and "no" in lines["cifar10"]


def test_data_fetch_refuses_what_cannot_be_fetched():
    result = eos("data", "fetch", "digits")
    assert result.exit_code == 2 and "error:" in result.output


def test_plot_and_report_write_files(tiny_data_dir, tmp_path):
    for opt, lr in (("gd", "0.5"), ("vradam", "0.01")):
        r = eos("run", "eos-fullbatch", "--optimizer", opt, "--lr", lr, "--steps", "10", "--data-dir", tiny_data_dir,
                "--out", tmp_path / "runs", "--name", opt, "--track-k", "2", *TINY)
        assert r.exit_code == 0, r.output
    result = eos("plot", tmp_path / "runs", "--out", tmp_path / "fig")
    assert result.exit_code == 0, result.output
    paths = [line for line in result.output.splitlines() if line.endswith((".png", ".pdf"))]
    assert any("sharpness" in p for p in paths) and any("damping" in p for p in paths)
    from pathlib import Path

    assert all(Path(p).stat().st_size > 1000 for p in paths)
    result = eos("report", tmp_path / "runs", "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    report = Path(result.output.strip().splitlines()[-1])
    assert report.exists() and "sharpness" in report.read_text().lower()


@pytest.mark.slow
def test_demo_runs_and_writes_figures(tmp_path):
    from experiments.data import DatasetNotFoundError, resolve_dataset

    try:
        resolve_dataset("auto")
    except DatasetNotFoundError:
        pytest.skip("no data set here: eos data fetch fashion-mnist")
    result = eos("demo", "--out", tmp_path / "demo", "--device", "cpu")
    assert result.exit_code == 0, result.output
    figures = [line.strip() for line in result.output.splitlines() if line.strip().endswith(".png")]
    assert any("sharpness" in f for f in figures) and any("damping" in f for f in figures)


def test_tasks_lists_every_task_with_the_options_it_reads():
    from experiments.tasks import TASKS, task_class

    result = eos("tasks")
    assert result.exit_code == 0, result.output
    for name, (_, _, summary) in TASKS.items():
        assert f"{name}\n  {summary}\n  reads: {', '.join(task_class(name).options)}" in result.output
    assert "language-model" in eos("run", "--help").output


def test_a_language_model_runs_from_the_command_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 30)
    result = eos("run", "language-model", "--data", f"text:{text}", "--steps", "6", "--track-every", "3",
                 "--device", "cpu", "--set", "context=16", "--set", "batch_size=4", "--set", "track_n=4",
                 "--set", "eval_n=4", "--set", 'model_options={"n_layer": 1, "n_head": 1, "d_model": 8}',
                 "--set", "hvp_method=double_backward", "--out", tmp_path, "--name", "lm")
    assert result.exit_code == 0, result.output
    run = read_run(tmp_path / "lm")
    assert run.config["optimizer"] == "adamw" and run.config["lr"] == 3e-3  # the task's defaults
    assert {"val_ppl", "val_ppl_unigram", "test_ppl", "precond_sharpness"} <= set(run.metrics.metric)
    # CPU flash attention has no second derivative: one plain line, none of torch's text, and an event
    warned = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "math attention" in warned[0], result.stderr
    assert "PyTorch" not in result.stderr and "github" not in result.stderr
    assert [e["event"] for e in run.events].count("kernel_fallback") == 1


def test_every_run_config_key_is_an_option_typed_by_its_declaration():
    """`eos run`'s options are made from RunConfig: none missing, each parsed as its annotation says."""
    import inspect
    from typing import Optional

    from experiments.cli import run
    from experiments.config import RunConfig, config_keys

    params = dict(inspect.signature(run).parameters)
    for key in config_keys():
        if key.name == "task" or key.type is dict:
            continue
        assert key.help, f"RunConfig.{key.name} has no comment to be its --help"
        assert params.pop(key.name).annotation == Optional[key.type], key.name
        assert getattr(RunConfig(), key.name) == key.default
        if key.type in (int, float):  # the parser, not the training code, refuses a non-number
            flag = "--" + key.name.replace("_", "-")
            result = eos("run", "gflownet", flag, "x")
            assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, (flag, result.output)
    assert sorted(params) == ["config", "name", "nproc", "out", "set_", "task"]  # the command's own parameters


@pytest.mark.parametrize("args, message", [
    (["--steps", "2.5"], "Invalid value for '--steps'"),  # int, from `steps: int | None`
    (["--R0", "x"], "Invalid value for '--R0'"),  # float
    (["--track-precond", "yes"], "Got unexpected extra argument"),  # a bool is a flag: --track-precond / --no-...
])
def test_an_option_rejects_a_value_of_the_wrong_type(args, message):
    result = eos("run", "gflownet", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_flags_and_keys_without_a_hand_written_option_reach_the_config(tiny_data_dir, tmp_path):
    result = eos("run", "eos-fullbatch", "--optimizer", "adam", "--lr", "1e-3", "--steps", "5", "--no-track-precond",
                 "--lanczos-tol", "1e-4", "--data-dir", tiny_data_dir, "--out", tmp_path, "--name", "r", *TINY)
    assert result.exit_code == 0, result.output
    config = read_run(tmp_path / "r").config
    assert config["track_precond"] is False and config["lanczos_tol"] == 1e-4


@pytest.mark.slow  # torchrun and two ranks that import torch: 10-15 s (tests/experiments/test_distributed.py
def test_nproc_runs_the_command_under_torchrun(tiny_data_dir, tmp_path):  # covers the same code in the default run)
    """`eos run --nproc 2` starts two gloo ranks through torchrun; rank 0 writes the one record."""
    result = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.1", "--steps", "4", "--nproc", "2",
                 "--data-dir", tiny_data_dir, "--out", tmp_path, "--name", "two", *TINY)
    assert result.exit_code == 0, result.output
    run = read_run(tmp_path / "two")
    assert run.status == "finished" and run.environment["distributed"]["world_size"] == 2
    assert [e["event"] for e in run.events] == ["started", "hvp_method", "finished"]
    assert run.config["steps"] == 4 and run.config["n_train"] == 100  # the options reached every rank


def test_compare_has_three_subcommands_each_with_its_own_usage_and_options():
    listed = eos("compare", "--help")
    assert listed.exit_code == 0, listed.output
    commands = listed.output.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in commands] == ["run", "worker", "report"]
    spec_options = ["--preset", "--out", "--storage", "--scale", "--allow-unequal-budget"]
    for command, usage, shown, absent in (
        ("run", "compare run [OPTIONS] [SPEC]", spec_options + ["--workers"], []),
        ("worker", "compare worker [OPTIONS] [SPEC]", spec_options, ["--workers"]),
        ("report", "compare report [OPTIONS] {DIR}", [], spec_options + ["--workers"]),
    ):
        result = eos("compare", command, "--help")
        assert result.exit_code == 0, result.output
        assert usage in result.output, result.output
        assert all(option in result.output for option in shown), (command, result.output)
        assert not any(option in result.output for option in absent), (command, result.output)
