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
    # lr 0.5: the tiny network starts above 2/lr = 4, so the flow's first step is at the edge
    made = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.5", "--steps", "8", "--data-dir",
               tiny_data_dir, "--out", tmp_path, "--name", "gd", *TINY)
    assert made.exit_code == 0, made.output
    run_dir = tmp_path / "gd"
    result = eos("flow", run_dir)
    assert result.exit_code == 0, result.output
    assert "central flow (gd) over 8 steps" in result.output
    assert "replay matches the record's train loss to 0 (relative)" in result.output  # deterministic

    rec = read_run(run_dir)
    assert rec.status == "finished"  # the run's own status is untouched
    flow_rows = rec.metrics[rec.metrics.metric.map(names.is_flow_metric)]
    assert FLOW_METRICS <= set(flow_rows.metric)
    for metric in FLOW_METRICS:  # every step once (the displacement only where the flow had an edge)
        assert sorted(flow_rows[flow_rows.metric == metric].step) == list(range(8)), metric
    assert names.FLOW_DISPLACEMENT_TOP in set(flow_rows.metric)
    wide = rec.metrics.pivot_table(index="step", columns="metric", values="value")
    # the run's initial weights (the flow sums its chunks in float64, the run in float32)
    assert wide.loc[0, names.FLOW_LOSS] == pytest.approx(wide.loc[0, names.TRAIN_LOSS], rel=1e-6)
    assert wide.loc[0, names.FLOW_THRESHOLD] == 4.0 and wide.loc[0, names.FLOW_EDGE_COUNT] >= 1
    assert wide.loc[0, names.FLOW_PREDICTED_LOSS] > wide.loc[0, names.FLOW_LOSS]  # the oscillation's share
    events = [e["event"] for e in rec.events]
    assert events[-2:] == ["flow_started", "flow_finished"]

    again = eos("flow", run_dir)
    assert again.exit_code != 0 and "already holds a central flow; pass --replace" in again.output
    replaced = eos("flow", run_dir, "--replace", "--steps", "5")
    assert replaced.exit_code == 0, replaced.output
    counts = read_run(run_dir).metrics.query("metric == @names.FLOW_LOSS").step.tolist()
    assert counts == list(range(5))  # the earlier flow's rows are gone, none twice

    agreement = analysis.flow_agreement(analysis.load_run(run_dir))
    assert agreement["steps"] == 5 and agreement["edge_onset"] == 0
    assert math.isfinite(agreement["cost_ratio"]) and agreement["cost_ratio"] > 0
    plotted = eos("plot", run_dir, "--kind", "flow", "--out", tmp_path / "figures")
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "figures" / "flow_gd.png").exists()


def test_a_flow_that_fails_keeps_what_it_wrote_and_says_why(tiny_data_dir, tmp_path, monkeypatch):
    from eos_toolkit.central_flow import CentralFlow
    from experiments.flow import integrate_flow

    made = eos("run", "eos-fullbatch", "--optimizer", "gd", "--lr", "0.1", "--steps", "6", "--data-dir",
               tiny_data_dir, "--out", tmp_path, "--name", "gd", *TINY)
    assert made.exit_code == 0, made.output
    step = CentralFlow.step

    def failing(self):
        if self.state.t >= 3:
            raise FloatingPointError("the third derivative overflowed")
        return step(self)

    monkeypatch.setattr(CentralFlow, "step", failing)
    with pytest.raises(FloatingPointError):
        integrate_flow(tmp_path / "gd", k=1)
    rec = read_run(tmp_path / "gd")
    assert rec.status == "finished"
    assert rec.metrics.query("metric == @names.FLOW_LOSS").step.tolist() == [0, 1, 2]
    failed = [e for e in rec.events if e["event"] == "flow_failed"]
    assert failed and failed[0]["error"] == "FloatingPointError: the third derivative overflowed"
