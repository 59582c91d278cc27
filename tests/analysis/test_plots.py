"""Each plot returns Axes with the expected artists (found by gid), under the Agg backend."""

import math

import numpy as np
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
    make_run(tmp_path, "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0}, gd_rows())
    make_run(tmp_path, "gd1", {"optimizer": "gd", "lr": 0.05, "seed": 1}, gd_rows())
    make_run(tmp_path, "vr", {"optimizer": "vradam", "lr": 0.002, "seed": 0, "vradam": {"alpha1": 4.0}},
             vradam_rows())
    make_run(tmp_path, "div", {"optimizer": "gd", "lr": 0.5, "seed": 0},
             [(0, "train_loss", 1.0), (1, "train_loss", 30.0), (2, "train_loss", math.inf),
              (0, "sharpness", 3.0), (0, "threshold", 4.0), (2, "sharpness", math.nan), (2, "threshold", 4.0)],
             events=(("started", 0), ("diverged", 2)))
    return analysis.load_runs(tmp_path)


def ax_new():
    return Figure().add_subplot()


def test_sharpness_draws_each_run_with_its_threshold(hand_runs):
    gd = hand_runs.df[hand_runs.df["run_id"].isin(["gd", "gd1", "div"])]
    ax = analysis.plot_sharpness(gd, ax=ax_new())
    assert isinstance(ax, Axes)
    assert gids(ax) == {"sharpness": 3, "threshold": 3}
    thresholds = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert [set(t.get_ydata()) for t in thresholds] == [{4.0}, {40.0}, {40.0}]  # div, gd, gd1
    assert all(t.get_linestyle() == "--" for t in thresholds)
    for line in ax.lines:  # the diverged run's nan is left out
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["GD lr=0.5", "GD lr=0.05"]  # runs in order div, gd, gd1; seeds share one entry


def test_sharpness_vradam_has_the_moving_threshold_and_band(hand_runs):
    vr = hand_runs.df[hand_runs.df["run_id"] == "vr"]
    ax = analysis.plot_sharpness(vr, ax=ax_new())
    assert gids(ax) == {"sharpness": 1, "threshold": 1, "threshold_eta": 1}
    assert gids(ax, "collections") == {"threshold_band": 1}
    eta_line = [line for line in ax.lines if line.get_gid() == "threshold_eta"][0]
    assert list(eta_line.get_ydata()) == pytest.approx([95000, 95000, 38000, 19000])
    assert "P^{-1}H" in ax.get_ylabel()


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
    ax = analysis.plot_loss(hand_runs, ax=ax_new())
    g = gids(ax)
    assert g["loss"] == 4 and g["diverged"] == 1
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
    runs = analysis.load_runs(synthetic_runs)
    ax = analysis.plot_spectrum(runs.df, ax=ax_new(), run_id="gd_lr0.05_s0")
    assert gids(ax) == {"eigenvalue": 3, "threshold": 1}
    assert analysis.plot_spectrum(runs["gd_lr0.05_s0"].df, ax=ax_new(), k=2).lines[1].get_label() == r"$\lambda_{2}$"
    with pytest.raises(ValueError, match="pass run_id"):
        analysis.plot_spectrum(runs.df)
    density = runs.density
    ax = analysis.plot_density(density, ax=ax_new(), run_id="gd_lr0.05_s0", threshold=40.0)
    assert gids(ax, "collections") == {"density": 1} and gids(ax) == {"threshold": 1}
    ax = analysis.plot_density(density, ax=ax_new(), kind="lines", max_curves=4, threshold=40.0)
    assert gids(ax) == {"density": 4, "threshold": 1}
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
    assert adam.get_label() == "Adam lr=0.001 (n=3)" and gd.get_label() == "GD lr=0.1 (n=1, 1 left out)"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    half = 4.302652729911275 * 0.2 / math.sqrt(3)
    assert max(band) == pytest.approx(1.2 + half) and min(band) == pytest.approx(1.0 - half)
    ax = analysis.plot_comparison(df, ax=ax_new())  # log: geometric mean
    assert list(ax.lines[0].get_ydata()) == pytest.approx([(1.0 * 1.2 * 1.4) ** (1 / 3), (0.9 * 1.1 * 1.3) ** (1 / 3),
                                                           (0.8 * 1.0 * 1.2) ** (1 / 3)])


def test_plots_open_their_own_figure_when_no_axes_is_given(hand_runs):
    ax = analysis.plot_loss(hand_runs)
    assert isinstance(ax, Axes) and ax.figure is not None


def test_adam_tracked_without_preconditioner_shows_raw_sharpness_and_no_threshold(tmp_path):
    make_run(tmp_path, "adam", {"optimizer": "adam", "lr": 0.001, "seed": 0},
             [(0, "sharpness", 5.0), (10, "sharpness", 7.0), (0, "train_loss", 1.0)])
    df = analysis.load_run(tmp_path / "adam").df
    assert analysis.stability_metrics(df, "adam").sharpness == "sharpness"
    assert analysis.stability_summary(df)["first_crossing_step"].tolist() == [None]
    ax = analysis.plot_sharpness(df, ax=ax_new())
    assert gids(ax) == {"sharpness": 1}
