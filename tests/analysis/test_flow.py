"""The central flow's agreement figures, on a record whose answers are known by construction."""

import matplotlib
import pytest

import analysis
from eos_toolkit import metrics as names
from eos_toolkit.record import RunWriter

matplotlib.use("Agg")


@pytest.fixture
def flow_record(tmp_path):
    """40 steps; the edge from step 10 on; exact answers: see the test."""
    writer = RunWriter.create(tmp_path / "run", config={"optimizer": "gd", "lr": 0.05})
    writer.event("started", step=0)
    rows = []
    for t in range(40):
        edge = t >= 10
        rows += [(t, names.TRAIN_LOSS, 0.5), (t, names.ETA, 0.05),
                 (t, names.FLOW_LOSS, 0.4), (t, names.FLOW_PREDICTED_LOSS, 0.5 if edge else 0.4),
                 (t, names.FLOW_SHARPNESS, 40.0 if edge else 30.0), (t, names.FLOW_THRESHOLD, 40.0),
                 (t, names.FLOW_RATE, 0.05), (t, names.FLOW_EDGE_COUNT, 1.0 if edge else 0.0),
                 (t, names.FLOW_VARIANCE, 0.01 if edge else 0.0), (t, names.FLOW_VARIANCE_TOP, 0.01 if edge else 0.0),
                 (t, names.FLOW_DISTANCE, 0.1), (t, names.FLOW_MATVECS, 12.0), (t, names.FLOW_THIRD_DERIVATIVES, 4.0),
                 (t, names.FLOW_SECONDS, 2.0), (t, names.FLOW_REPLAY_SECONDS, 0.1)]
        if edge:  # the real iterate alternates between on the flow and 0.02 off it: mean 0.01
            rows += [(t, names.FLOW_DISPLACEMENT_TOP, 0.02 * (t % 2)), (t, names.FLOW_DISPLACEMENT, 0.02 * (t % 2))]
        if t % 5 == 0:
            rows += [(t, names.SHARPNESS, 42.0), (t, names.THRESHOLD, 40.0)]
    writer.log_metrics(rows)
    writer.event("finished", step=40)
    writer.event("flow_started", step=0, rule="gd")
    writer.event("flow_finished", step=40)
    return analysis.load_run(tmp_path / "run")


def test_agreement_figures_are_the_constructed_ones(flow_record):
    a = analysis.flow_agreement(flow_record)
    assert (a["steps"], a["edge_steps"], a["edge_onset"]) == (40, 30, 10)
    assert a["loss_error_median"] == 0 and a["loss_error_of_means"] == 0
    assert a["plain_loss_error_median"] == pytest.approx(0.2)  # |0.4 - 0.5| / 0.5
    assert a["flow_sharpness_ratio_mean"] == 1.0
    assert a["real_sharpness_ratio_mean"] == pytest.approx(1.05) and a["real_sharpness_ratio_std"] == 0
    assert a["variance_ratio_of_means"] == pytest.approx(1.0, abs=0.04)  # 15 of 30 edge steps are odd
    assert a["cost_ratio"] == pytest.approx(20.0) and a["third_derivatives_per_step"] == 4
    assert "rate_error_median" not in a  # a gate only for VRAdam
    table = analysis.flow_agreement_table([flow_record])
    assert list(table.label) == [flow_record.label] and table.rule.tolist() == ["gd"]


def test_the_figure_draws_run_and_flow(flow_record):
    axes = analysis.plot_flow(flow_record)
    gids = {line.get_gid() for ax in axes for line in ax.lines}
    assert {"loss", "averaged_loss", "flow_predicted_loss", "flow_loss", "sharpness", "flow_sharpness",
            "threshold", "displacement", "averaged_displacement", "flow_variance"} <= gids


def test_a_run_without_a_flow_is_named(tmp_path):
    writer = RunWriter.create(tmp_path / "plain", config={"optimizer": "gd"})
    writer.log_metrics([(0, names.TRAIN_LOSS, 1.0)])
    with pytest.raises(ValueError, match="plain holds no central flow: run eos flow on it first"):
        analysis.flow_agreement(analysis.load_run(tmp_path / "plain"))
