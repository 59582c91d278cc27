"""Sweeps: expansion, equal budgets, emitted commands, local runs that skip and resume."""

import json
import shlex

import pytest
from typer.testing import CliRunner

from eos_toolkit.record import read_run
from experiments.cli import app
from experiments.config import ConfigError
from experiments.sweep import expand_sweep

BASE = {"dataset": "fashion-mnist", "n_train": 100, "steps": 4, "track_every": 2, "device": "cpu",
        "model_options": {"hidden": [8]}}


def test_expansion_names_and_seeds():
    runs = expand_sweep({"base": BASE, "seeds": [0, 1], "grid": [
        {"optimizer": "adam", "lr": [0.001, 0.002]},
        {"optimizer": "vradam", "lr": [0.001, 0.002], "beta3": 1.0},
    ]})
    assert len(runs) == 8
    names = [r.name for r in runs]
    assert names[:2] == ["adam-lr0.001-s0", "adam-lr0.001-s1"]
    assert "vradam-beta31-lr0.002-s1" in names
    assert {r.config.seed for r in runs} == {0, 1}
    assert all(r.config.steps == 4 for r in runs)


def test_unequal_budgets_are_refused_unless_allowed():
    spec = {"grid": [{"optimizer": "adam", "lr": [0.001]}, {"optimizer": "vradam", "lr": [0.001, 0.002]}]}
    with pytest.raises(ConfigError, match=r"unequal tuning budgets \{'adam': 1, 'vradam': 2\}"):
        expand_sweep(spec)
    assert len(expand_sweep(spec, allow_unequal_budget=True)) == 3


def test_bad_sweep_values_are_named():
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        expand_sweep({"grid": [{"optimizer": "lion"}]})
    with pytest.raises(ConfigError, match=r"unknown sweep key\(s\) \['seed'\]"):
        expand_sweep({"seed": 1})


def test_cli_prints_commands_and_runs_locally(tiny_data_dir, tmp_path):
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"base": {**BASE, "data_dir": str(tiny_data_dir)}, "seeds": [0],
                                "grid": [{"optimizer": "gd", "lr": 0.1}, {"optimizer": "adam", "lr": 0.01}]}))
    runner = CliRunner()
    printed = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "s"), "--print-commands"])
    assert printed.exit_code == 0, printed.output
    lines = printed.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("eos run eos-fullbatch --config ")
    # An emitted command, run as a scheduler would run it.
    argv = shlex.split(lines[0])[1:]
    assert runner.invoke(app, argv).exit_code == 0
    ran = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "s")])
    assert ran.exit_code == 0, ran.output
    assert "gd-lr0.1-s0: finished (already recorded)" in ran.output
    assert "adam-lr0.01-s0: finished" in ran.output
    assert read_run(tmp_path / "s" / "adam-lr0.01-s0").status == "finished"


def test_parallel_runs_match_serial_ones(tiny_data_dir, tmp_path):
    from experiments.sweep import run_sweep

    runs = expand_sweep({"base": {**BASE, "data_dir": str(tiny_data_dir)}, "seeds": [0, 1],
                         "grid": [{"optimizer": "gd", "lr": 0.1}]})
    serial = run_sweep(runs, tmp_path / "serial", jobs=1)
    parallel = run_sweep(runs, tmp_path / "parallel", jobs=2)
    assert serial == parallel == {"gd-lr0.1-s0": "finished", "gd-lr0.1-s1": "finished"}
    for r in runs:
        a, b = (read_run(tmp_path / d / r.name).metrics for d in ("serial", "parallel"))
        keep = ~a.metric.str.endswith("_seconds")
        assert a[keep]["value"].tolist() == pytest.approx(b[keep]["value"].tolist(), rel=1e-6)


def test_a_record_made_under_another_config_is_refused(tiny_data_dir, tmp_path):
    """After an edit of the spec, an old record with the same run name must not count as done."""
    from experiments.sweep import run_sweep

    base = {**BASE, "data_dir": str(tiny_data_dir), "dataset": "auto"}
    runs = expand_sweep({"base": base, "grid": [{"optimizer": "gd", "lr": 0.1}]})
    assert run_sweep(runs, tmp_path / "s") == {"gd-lr0.1-s0": "finished"}
    assert runs[0].config.dataset == "auto"  # the run recorded its resolved data set, the sweep's config is untouched
    again = expand_sweep({"base": base, "grid": [{"optimizer": "gd", "lr": 0.1}]})
    assert run_sweep(again, tmp_path / "s") == {"gd-lr0.1-s0": "finished (already recorded)"}  # auto -> the same
    # Fashion-MNIST goes and MNIST comes: auto now means MNIST, so the record is stale.
    (tiny_data_dir / "fashion-mnist").rename(tiny_data_dir / "mnist")
    with pytest.raises(ConfigError, match="dataset: recorded 'fashion-mnist', sweep 'mnist'"):
        run_sweep(again, tmp_path / "s")
    (tiny_data_dir / "mnist").rename(tiny_data_dir / "fashion-mnist")
    edited = expand_sweep({"base": {**base, "steps": 6}, "grid": [{"optimizer": "gd", "lr": 0.1}]})
    assert [r.name for r in edited] == [r.name for r in runs]  # base keys are not in the name
    with pytest.raises(ConfigError, match=r"gd-lr0.1-s0: steps: recorded 4, sweep 6"):
        run_sweep(edited, tmp_path / "s")
    nested = expand_sweep({"base": base, "grid": [{"optimizer": "gd", "lr": 0.1, "model_options": {"hidden": [9]}}]})
    with pytest.raises(ConfigError, match=r"model_options: recorded \{'hidden': \[8\]\}, sweep \{'hidden': \[9\]\}"):
        run_sweep(nested, tmp_path / "s")
