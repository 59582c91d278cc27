"""eos flow: the central flow integrated beside a replay of a full-batch run, into the run's record."""

import math

import pytest
from typer.testing import CliRunner

import analysis
from eos_toolkit import metrics as names
from eos_toolkit.record import read_run
from experiments.cli import app

runner = CliRunner()
TINY = ["--data", "fashion-mnist", "--n-train", "100", "--track-every", "4", "--device", "cpu",
        "--set", "model_options={\"hidden\": [12]}", "--set", "chunk_size=64"]
FLOW_METRICS = {names.FLOW_LOSS, names.FLOW_PREDICTED_LOSS, names.FLOW_SHARPNESS, names.FLOW_THRESHOLD,
                names.FLOW_RATE, names.FLOW_EDGE_COUNT, names.FLOW_VARIANCE, names.FLOW_VARIANCE_TOP,
                names.FLOW_DISTANCE, names.FLOW_MATVECS, names.FLOW_THIRD_DERIVATIVES, names.FLOW_SECONDS,
                names.FLOW_REPLAY_SECONDS}


def eos(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eos_flow_records_the_flow_beside_the_run(tiny_data_dir, tmp_path):
    made = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.3", "--steps", "8", "--data-dir",
               tiny_data_dir, "--out", tmp_path, "--name", "gd", *TINY)
    assert made.exit_code == 0, made.output
    run_dir = tmp_path / "gd"
    result = eos("flow", run_dir)
    assert result.exit_code == 0, result.output
    assert "central flow (gd) over 8 steps" in result.output
    assert "replay matches the record's train loss to 0 (relative)" in result.output  # deterministic
    assert "the flow never reached its threshold" in result.output  # 2/lr = 6.7, the sharpness about 5

    rec = read_run(run_dir)
    assert rec.status == "finished"  # the run's own status is untouched
    flow_rows = rec.metrics[rec.metrics.metric.map(names.is_flow_metric)]
    assert FLOW_METRICS <= set(flow_rows.metric)
    for metric in FLOW_METRICS:  # every step once (the displacement only where the flow had an edge)
        assert sorted(flow_rows[flow_rows.metric == metric].step) == list(range(8)), metric
    wide = rec.metrics.pivot_table(index="step", columns="metric", values="value")
    # the run's initial weights (the flow sums its chunks in float64, the run in float32)
    assert wide.loc[0, names.FLOW_LOSS] == pytest.approx(wide.loc[0, names.TRAIN_LOSS], rel=1e-6)
    assert (wide[names.FLOW_THRESHOLD].dropna() == 2 / 0.3).all()
    flow = wide.dropna(subset=[names.FLOW_LOSS])
    assert (flow[names.FLOW_PREDICTED_LOSS] == flow[names.FLOW_LOSS]).all()  # no oscillation below the edge
    assert [e["event"] for e in rec.events][-2:] == ["flow_started", "flow_finished"]

    again = eos("flow", run_dir)
    assert again.exit_code != 0 and "already holds a central flow; pass --replace" in again.output
    replaced = eos("flow", run_dir, "--replace", "--start", "3", "--steps", "4")
    assert replaced.exit_code == 0, replaced.output
    rec = read_run(run_dir)
    assert rec.metrics.query("metric == @names.FLOW_LOSS").step.tolist() == [3, 4, 5, 6]  # none twice
    started = [e for e in rec.events if e["event"] == "flow_started"][-1]
    assert started["step"] == 3
    wide = rec.metrics.pivot_table(index="step", columns="metric", values="value")
    assert wide.loc[3, names.FLOW_LOSS] == pytest.approx(wide.loc[3, names.TRAIN_LOSS], rel=1e-6)  # the replay's

    agreement = analysis.flow_agreement(analysis.load_run(run_dir))
    assert agreement["steps"] == 4 and agreement["edge_steps"] == 0
    assert math.isfinite(agreement["cost_ratio"]) and agreement["cost_ratio"] > 0
    plotted = eos("plot", run_dir, "--kind", "flow", "--out", tmp_path / "figures")
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "figures" / "flow_gd.png").exists()


def test_a_flow_that_starts_above_its_threshold_says_where_to_start(tiny_data_dir, tmp_path):
    # lr 0.5: the tiny network starts at 1.34 x 2/lr, and is below it by the first tracking step
    made = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.5", "--steps", "8", "--data-dir",
               tiny_data_dir, "--out", tmp_path, "--name", "gd", *TINY)
    assert made.exit_code == 0, made.output
    result = eos("flow", tmp_path / "gd")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "at step 0 the flow starts above its threshold" in result.output
    assert "e.g. --start 4, the first tracked step the run was below it" in result.output
    assert not any(names.is_flow_metric(m) for m in read_run(tmp_path / "gd").metrics.metric)  # nothing written


def test_a_flow_that_fails_keeps_what_it_wrote_and_says_why(tiny_data_dir, tmp_path, monkeypatch):
    from eos_toolkit.central_flow import CentralFlow
    from experiments.flow import integrate_flow

    made = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.1", "--steps", "6", "--data-dir",
               tiny_data_dir, "--out", tmp_path, "--name", "gd", *TINY)
    assert made.exit_code == 0, made.output
    step = CentralFlow.step

    def failing(self, next_lr=None):
        if self.state.t >= 3:
            raise FloatingPointError("the third derivative overflowed")
        return step(self, next_lr)

    monkeypatch.setattr(CentralFlow, "step", failing)
    with pytest.raises(FloatingPointError):
        integrate_flow(tmp_path / "gd", k=1)
    rec = read_run(tmp_path / "gd")
    assert rec.status == "finished"
    assert rec.metrics.query("metric == @names.FLOW_LOSS").step.tolist() == [0, 1, 2]
    failed = [e for e in rec.events if e["event"] == "flow_failed"]
    assert failed and failed[0]["error"] == "FloatingPointError: the third derivative overflowed"
