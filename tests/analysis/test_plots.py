"""Each plot draws the recorded values (lines found by gid), under the Agg backend.

Expected values come from the hand-made rows of tests/analysis/test_summary.py,
or from the synthetic set's CSV files read directly with pandas.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import analysis
from tests.analysis.conftest import make_run
from tests.analysis.test_summary import gd_rows, vradam_rows


def gids(ax, kind="lines"):
    items = ax.lines if kind == "lines" else ax.collections
    out = {}
    for item in items:
        out[item.get_gid()] = out.get(item.get_gid(), 0) + 1
    return out


@pytest.fixture
def hand_runs(tmp_path):
    """Records as a run writes them (with the label its optimizer's display name gives)."""
    make_run(tmp_path, "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0, "label": "GD lr=0.05"}, gd_rows())
    make_run(tmp_path, "gd1", {"optimizer": "gd", "lr": 0.05, "seed": 1, "label": "GD lr=0.05"}, gd_rows())
    make_run(tmp_path, "vr", {"optimizer": "vradam", "lr": 0.002, "seed": 0, "vradam": {"alpha1": 4.0},
                              "label": "VRAdam lr=0.002"}, vradam_rows())
    make_run(tmp_path, "div", {"optimizer": "gd", "lr": 0.5, "seed": 0, "label": "GD lr=0.5"},
             [(0, "train_loss", 1.0), (1, "train_loss", 30.0), (2, "train_loss", math.inf),
              (0, "sharpness", 3.0), (0, "threshold", 4.0), (2, "sharpness", math.nan), (2, "threshold", 4.0)],
             events=(("started", 0), ("diverged", 2)))
    return analysis.load_runs(tmp_path)


def ax_new():
    return Figure().add_subplot()


def recorded(rows, metric):
    """(steps, values) of ``metric`` in hand-made rows, non-finite values left out."""
    pairs = [(s, v) for s, m, v in rows if m == metric and math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def drawn(ax, gid):
    """(x, y) of every line with this gid, in drawing order."""
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines if line.get_gid() == gid]


def from_csv(run_dir, metric):
    """(steps, values) of ``metric`` read straight from a run's metrics.csv."""
    m = pd.read_csv(run_dir / "metrics.csv")
    m = m[m["metric"] == metric]
    return m["step"].tolist(), m["value"].tolist()


def test_sharpness_draws_each_run_with_its_threshold(hand_runs):
    """Sharpness and threshold lines carry the recorded steps and values of each run (the nan left out),
    the threshold dashed, the y-label names lambda_1(H), and the legend one entry per label."""
    gd = hand_runs.df[hand_runs.df["run_id"].isin(["gd", "gd1", "div"])]
    ax = analysis.plot_sharpness(gd, ax=ax_new())
    assert isinstance(ax, Axes)
    assert gids(ax) == {"sharpness": 3, "threshold": 3}
    sharp, thr = recorded(gd_rows(), "sharpness"), recorded(gd_rows(), "threshold")
    # runs in order div, gd, gd1; div's sharpness is nan at step 2
    assert drawn(ax, "sharpness") == [([0], [3.0]), sharp, sharp]
    assert drawn(ax, "threshold") == [([0, 2], [4.0, 4.0]), thr, thr]
    thresholds = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert all(t.get_linestyle() == "--" for t in thresholds)
    assert ax.get_ylabel() == r"sharpness $\lambda_1(H)$" and ax.get_xlabel() == "step"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["GD lr=0.5", "GD lr=0.05", "sharpness", "threshold"]  # seeds share one entry


def test_sharpness_vradam_has_the_moving_threshold_and_band(hand_runs):
    vr = hand_runs.df[hand_runs.df["run_id"] == "vr"]
    ax = analysis.plot_sharpness(vr, ax=ax_new())
    assert gids(ax) == {"sharpness": 1, "threshold": 1, "threshold_eta": 1}
    assert gids(ax, "collections") == {"threshold_band": 1}
    # The preconditioned pair is drawn, not the raw sharpness (1.0) and threshold (1e9) also in the rows.
    assert drawn(ax, "sharpness") == [recorded(vradam_rows(), "precond_sharpness")]
    assert drawn(ax, "threshold") == [recorded(vradam_rows(), "precond_threshold")]
    eta_line = [line for line in ax.lines if line.get_gid() == "threshold_eta"][0]
    assert list(eta_line.get_xdata()) == [0, 1, 2, 3]
    assert list(eta_line.get_ydata()) == pytest.approx([38 / 0.0004, 38 / 0.0004, 38 / 0.001, 38 / 0.002])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # between 38/lr = 19000 and 38/eta_t
    assert min(band) == pytest.approx(19000) and max(band) == pytest.approx(95000)
    assert ax.get_ylabel() == r"preconditioned sharpness $\lambda_1(P^{-1}H)$"


def test_sharpness_normalises_when_families_mix(hand_runs):
    ax = analysis.plot_sharpness(hand_runs.df, ax=ax_new())
    assert ax.get_ylabel() == "sharpness / stability threshold"
    thresholds = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert len(thresholds) == 1 and set(thresholds[0].get_ydata()) == {1.0}  # one line at 1 for all runs
    assert gids(ax)["sharpness"] == 4 and gids(ax)["threshold_eta"] == 1
    sharp = [line for line in ax.lines if line.get_gid() == "sharpness"][1]  # gd (after div): 10..39.5 over 40
    assert list(sharp.get_ydata()) == pytest.approx([0.25, 0.75, 0.975, 1.025, 1.05, 0.9875])


def test_sharpness_without_data_is_an_error(tmp_path):
    make_run(tmp_path, "r", {"optimizer": "gd", "lr": 0.1}, [(0, "train_loss", 1.0)])
    with pytest.raises(ValueError, match="sharpness"):
        analysis.plot_sharpness(analysis.load_run(tmp_path / "r"))


def test_loss_lines_rises_and_divergence(hand_runs):
    """Loss lines carry each run's recorded train_loss (inf left out), the x marks the diverged run's last
    step, and the rug ticks sit at the steps where the recorded loss rose."""
    ax = analysis.plot_loss(hand_runs, ax=ax_new())
    g = gids(ax)
    assert g["loss"] == 4 and g["diverged"] == 1
    gd_loss = recorded(gd_rows(), "train_loss")
    assert drawn(ax, "loss") == [([0, 1], [1.0, 30.0]), gd_loss, gd_loss, recorded(vradam_rows(), "train_loss")]
    assert [x for x, _ in drawn(ax, "diverged")] == [[2]]
    assert ax.get_ylabel() == "train loss"
    assert g["rises"] == 2  # one rug per label with rises: GD lr=0.05 and GD lr=0.5 (VRAdam falls steadily)
    div_rug, gd_rug = [line for line in ax.lines if line.get_gid() == "rises"]
    assert list(gd_rug.get_xdata()) == [20, 40]  # gd loss rose at steps 20 and 40
    assert list(div_rug.get_xdata()) == [1]  # 1 -> 30 is a rise; 30 -> inf is divergence, not counted
    assert ax.get_yscale() == "log"
    for line in ax.lines:
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all()
    ax = analysis.plot_loss(hand_runs, ax=ax_new(), logy=False, mark_rises=False, smooth_alpha=0.5)
    assert "rises" not in gids(ax) and ax.get_yscale() == "linear"


def test_damping(hand_runs):
    ax = analysis.plot_damping(hand_runs.df, ax=ax_new())
    assert gids(ax) == {"eta_over_lr": 1, "floor": 1}
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.2, 0.2, 0.5, 1.0])
    floor = [line for line in ax.lines if line.get_gid() == "floor"][0]
    assert floor.get_ydata()[0] == pytest.approx(1 / 5)
    assert gids(ax, "collections") == {"clamp": 1}
    twin = [a for a in ax.figure.axes if a is not ax][0]
    assert [line.get_gid() for line in twin.lines] == ["vr_sq_norm"] and twin.get_yscale() == "log"
    assert analysis.damping_runs(hand_runs.df) == ["vr"]
    with pytest.raises(ValueError, match="damping"):
        analysis.plot_damping(hand_runs.df[hand_runs.df["run_id"] == "gd"])


def test_spectrum_and_density(synthetic_runs):
    """Eigenvalue lines are hessian_eig_1..3 of the run's metrics.csv, the threshold its recorded 2/lr; the
    density figures show density.csv's curves (log10, 8 decades under the peak) and the given threshold."""
    runs = analysis.load_runs(synthetic_runs)
    run_dir = synthetic_runs / "gd_lr0.05_s0"
    ax = analysis.plot_spectrum(runs.df, ax=ax_new(), run_id="gd_lr0.05_s0")
    assert gids(ax) == {"eigenvalue": 3, "threshold": 1}
    lines = [line for line in ax.lines if line.get_gid() == "eigenvalue"]
    assert [line.get_label() for line in lines] == [r"$\lambda_{1}$", r"$\lambda_{2}$", r"$\lambda_{3}$"]
    for i, line in enumerate(lines, start=1):
        steps, values = from_csv(run_dir, f"hessian_eig_{i}")
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(values, rel=1e-12)
    ((thr_x, thr_y),) = drawn(ax, "threshold")
    steps, values = from_csv(run_dir, "threshold")
    assert thr_x == steps and thr_y == pytest.approx(values) and values == pytest.approx([2 / 0.05] * len(values))
    assert analysis.plot_spectrum(runs["gd_lr0.05_s0"].df, ax=ax_new(), k=2).lines[1].get_label() == r"$\lambda_{2}$"
    with pytest.raises(ValueError, match="pass run_id"):
        analysis.plot_spectrum(runs.df)
    density = runs.density
    curves = pd.read_csv(run_dir / "density.csv")
    ax = analysis.plot_density(density, ax=ax_new(), run_id="gd_lr0.05_s0", threshold=40.0)
    assert gids(ax, "collections") == {"density": 1} and gids(ax) == {"threshold": 1}
    assert ax.collections[0].get_array().shape[1] == curves["step"].nunique()  # one column per measured step
    assert drawn(ax, "threshold")[0][1] == [40.0, 40.0]
    ax = analysis.plot_density(density, ax=ax_new(), kind="lines", max_curves=4, threshold=40.0)
    assert gids(ax) == {"density": 4, "threshold": 1}
    assert drawn(ax, "threshold")[0][0] == [40.0, 40.0]  # vertical at the threshold
    shown = [line for line in ax.lines if line.get_gid() == "density"]
    first_step, last_step = curves["step"].min(), curves["step"].max()
    assert shown[0].get_label() == f"step {first_step}" and shown[-1].get_label() == f"step {last_step}"
    first = curves[curves["step"] == first_step]
    floor = curves["density"].max() * 1e-8
    assert list(shown[0].get_xdata()) == pytest.approx(first["eigenvalue"].tolist())
    assert list(shown[0].get_ydata()) == pytest.approx(np.log10(np.maximum(first["density"], floor)) - np.log10(floor))
    with pytest.raises(ValueError, match="kind"):
        analysis.plot_density(density, kind="surface")


def test_comparison_mean_and_band(tmp_path):
    for seed, offset in enumerate([0.0, 0.2, 0.4]):
        make_run(tmp_path, f"a{seed}", {"optimizer": "adam", "lr": 0.001, "seed": seed},
                 [(s, "train_loss", 1.0 + offset - 0.1 * s) for s in range(3)])
    make_run(tmp_path, "g0", {"optimizer": "gd", "lr": 0.1, "seed": 0}, [(s, "train_loss", 2.0) for s in range(3)])
    make_run(tmp_path, "g1", {"optimizer": "gd", "lr": 0.1, "seed": 1},
             [(0, "train_loss", 5.0), (1, "train_loss", math.inf)], events=(("started", 0), ("diverged", 1)))
    df = analysis.load_runs(tmp_path).df
    ax = analysis.plot_comparison(df, ax=ax_new(), logy=False)
    assert gids(ax) == {"mean": 2} and gids(ax, "collections") == {"band": 2}
    adam, gd = ax.lines
    assert list(adam.get_ydata()) == pytest.approx([1.2, 1.1, 1.0])
    assert list(gd.get_ydata()) == [2.0, 2.0, 2.0]  # the diverged seed is left out
    assert adam.get_label() == "adam lr=0.001 (n=3)" and gd.get_label() == "gd lr=0.1 (n=1, 1 left out)"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    half = 4.302652729911275 * 0.2 / math.sqrt(3)
    assert max(band) == pytest.approx(1.2 + half) and min(band) == pytest.approx(1.0 - half)
    ax = analysis.plot_comparison(df, ax=ax_new())  # log: geometric mean
    assert list(ax.lines[0].get_ydata()) == pytest.approx([(1.0 * 1.2 * 1.4) ** (1 / 3), (0.9 * 1.1 * 1.3) ** (1 / 3),
                                                           (0.8 * 1.0 * 1.2) ** (1 / 3)])


def test_plots_open_their_own_figure_when_no_axes_is_given(hand_runs):
    """Without ax, each plot opens one new pyplot figure of 6.4 x 4.0 inches and draws the records on it."""
    for plot, gid, metric in ((analysis.plot_loss, "loss", "train_loss"),
                              (analysis.plot_sharpness, "sharpness", "sharpness")):
        before = set(plt.get_fignums())
        ax = plot(hand_runs["gd"])
        assert isinstance(ax, Axes)
        assert set(plt.get_fignums()) - before == {ax.figure.number}
        assert list(ax.figure.get_size_inches()) == pytest.approx([6.4, 4.0])
        assert drawn(ax, gid) == [recorded(gd_rows(), metric)]


def test_adam_tracked_without_preconditioner_shows_raw_sharpness_and_no_threshold(tmp_path):
    make_run(tmp_path, "adam", {"optimizer": "adam", "lr": 0.001, "seed": 0},
             [(0, "sharpness", 5.0), (10, "sharpness", 7.0), (0, "train_loss", 1.0)])
    df = analysis.load_run(tmp_path / "adam").df
    assert analysis.stability_metrics(df, "adam").sharpness == "sharpness"
    assert analysis.stability_summary(df)["first_crossing_step"].tolist() == [None]
    ax = analysis.plot_sharpness(df, ax=ax_new())
    assert gids(ax) == {"sharpness": 1}
    assert drawn(ax, "sharpness") == [([0, 10], [5.0, 7.0])]
    assert ax.get_ylabel() == r"sharpness $\lambda_1(H)$"


def test_distribution_error_draws_the_recorded_l1_per_run():
    import pandas as pd

    rows = pd.DataFrame({"run_id": ["a"] * 4 + ["b"] * 2, "optimizer": ["adam"] * 4 + ["vradam"] * 2,
                         "lr": 1e-3, "label": ["Adam"] * 4 + ["VRAdam"] * 2,
                         "step": [0, 0, 100, 100, 0, 100],
                         "metric": ["l1_exact", "l1_empirical"] * 2 + ["l1_exact"] * 2,
                         "value": [1.2, 1.5, 0.3, 0.6, 1.1, 0.2]})
    ax = analysis.plot_distribution_error(rows)
    drawn = {(line.get_label(), line.get_gid()): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
             if line.get_gid() in ("l1_exact", "l1_empirical")}
    assert drawn == {("Adam", "l1_exact"): ([0, 100], [1.2, 0.3]), ("Adam", "l1_empirical"): ([0, 100], [1.5, 0.6]),
                     ("VRAdam", "l1_exact"): ([0, 100], [1.1, 0.2])}
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="none of the metrics"):
        analysis.plot_distribution_error(rows[rows.metric == "nothing"].assign(metric="train_loss"))
