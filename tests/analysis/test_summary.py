"""Per-run stability numbers and the comparison table, on hand-made records with known answers."""

import math

import pytest

import analysis
from tests.analysis.conftest import make_run

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (t table)


def gd_rows():
    sharp = [10, 30, 39, 41, 42, 39.5]
    loss = [1.0, 0.9, 1.0, 0.8, 0.85, 0.7]
    rows = []
    for i, (s, l) in enumerate(zip(sharp, loss)):
        step = 10 * i
        rows += [(step, "sharpness", s), (step, "threshold", 40.0), (step, "train_loss", l),
                 (step, "update_proj_top", (-1.0) ** i), (step, "update_cos", -0.5), (step, "eta", 0.05),
                 (step, "lr", 0.05)]
    return rows


def vradam_rows():
    rows = []
    for i, (eta, clamp) in enumerate([(0.0004, 1), (0.0004, 1), (0.001, 0), (0.002, 0)]):
        rows += [(i, "train_loss", 1.0 - 0.1 * i), (i, "lr", 0.002), (i, "eta", eta), (i, "vr_clamped", clamp),
                 (i, "vr_sq_norm", 5.0 - i), (i, "precond_sharpness", 18000.0 + 1000 * i),
                 (i, "precond_threshold", 19000.0), (i, "precond_threshold_eta", 38 / eta),
                 (i, "sharpness", 1.0), (i, "threshold", 1e9)]  # raw pair present but not used for VRAdam
    return rows


def test_stability_summary_known_answers(tmp_path):
    make_run(tmp_path, "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0}, gd_rows())
    make_run(tmp_path, "vr", {"optimizer": "vradam", "lr": 0.002, "seed": 0}, vradam_rows())
    table = analysis.stability_summary(analysis.load_runs(tmp_path).df).set_index("run_id")
    gd, vr = table.loc["gd"], table.loc["vr"]
    assert gd["sharpness"] == "sharpness" and vr["sharpness"] == "precond_sharpness"
    assert gd["first_crossing_step"] == 30 and gd["steps_above_threshold"] == 20
    assert gd["late_ratio"] == pytest.approx(1.025)  # median of 41, 42, 39.5 over 40
    assert gd["loss_rise_fraction"] == pytest.approx(2 / 5)
    assert gd["sign_flip_rate"] == 1.0 and gd["mean_update_cos"] == -0.5
    assert gd["mean_eta_over_lr"] == 1.0 and math.isnan(gd["clamp_fraction"])
    # VRAdam: precond sharpness 18000..21000 against 38/lr = 19000: crosses at step 1
    assert vr["first_crossing_step"] == 1 and vr["steps_above_threshold"] == 2
    assert vr["clamp_fraction"] == 0.5
    assert vr["mean_eta_over_lr"] == pytest.approx((0.2 + 0.2 + 0.5 + 1.0) / 4)
    # late half = steps 2, 3: 20000/19000 and 21000/19000 -> median 20500/19000
    assert vr["late_ratio"] == pytest.approx(20500 / 19000)
    assert vr["late_ratio_eta"] == pytest.approx((20000 / 38000 + 21000 / 19000) / 2)


def test_summary_table_mean_and_ci_over_seeds(tmp_path):
    for seed, final in enumerate([0.1, 0.2, 0.3]):
        make_run(tmp_path, f"gd{seed}", {"optimizer": "gd", "lr": 0.1, "seed": seed},
                 [(0, "train_loss", 1.0), (5, "train_loss", 0.5), (9, "train_loss", final),
                  (9, "val_acc", 0.8 + seed / 100)])
    make_run(tmp_path, "gd_div", {"optimizer": "gd", "lr": 0.1, "seed": 3},
             [(0, "train_loss", 1.0), (1, "train_loss", math.inf)], events=(("started", 0), ("diverged", 1)))
    make_run(tmp_path, "gd_kill", {"optimizer": "gd", "lr": 0.1, "seed": 4}, [(0, "train_loss", 0.01)],
             events=(("started", 0),))
    make_run(tmp_path, "adam", {"optimizer": "adam", "lr": 0.001, "seed": 0},
             [(0, "train_loss", 0.9), (9, "train_loss", 0.05)])
    df = analysis.load_runs(tmp_path).df

    per_run = analysis.run_summary(df, target_loss=0.5).set_index("run_id")
    assert per_run.loc["gd_div", "final_loss"] == math.inf and per_run.loc["gd_div", "best_loss"] == 1.0
    assert per_run.loc["gd1", "steps_to_target"] == 5 and per_run.loc["gd1", "final_acc"] == pytest.approx(0.81)

    table = analysis.summary_table(df, target_loss=0.5).set_index("optimizer")
    gd = table.loc["gd"]
    assert (gd["runs"], gd["diverged"], gd["unfinished"], gd["reached"]) == (5, 1, 1, 3)
    assert gd["final_loss_n"] == 3 and gd["final_loss_mean"] == pytest.approx(0.2)
    assert gd["final_loss_ci"] == pytest.approx(T975_2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert gd["steps_to_target_mean"] == 5 and gd["steps_to_target_ci"] == 0
    assert gd["final_acc_mean"] == pytest.approx(0.81)
    assert table.loc["adam", "final_loss_mean"] == 0.05 and math.isnan(table.loc["adam", "final_loss_ci"])
    assert table.loc["adam", "label"] == "adam lr=0.001"  # the records carry no label: the config's words

    text = analysis.format_summary(table.reset_index()).set_index("optimizer")
    assert text.loc["gd", "final_loss"] == f"0.2 ± {T975_2 * 0.1 / math.sqrt(3):.2g}"
    assert text.loc["adam", "final_loss"] == "0.05"
    md = analysis.markdown_table(text.reset_index())
    assert md.splitlines()[0].startswith("| optimizer | lr | label |") and md.count("\n") == 3

    with pytest.raises(ValueError, match="group_by"):
        analysis.summary_table(df, group_by=("nope",))
