"""Figures: ``plot_*(df, ax=None, ...) -> Axes``.

Each function draws on ``ax`` (or on a new figure when ``ax`` is None) and
returns it; none calls ``plt.show()`` or writes files (see
:func:`analysis.save_figures`). ``df`` is the tidy table of
:func:`analysis.load_runs` (a :class:`Run` or :class:`Runs` is accepted too).

Conventions, the same in every figure:

- colours from the Okabe-Ito palette (safe for colour-blind readers), one per
  run label, so seeds of one configuration share a colour;
- the stability threshold is dashed in the run's colour, as the run recorded
  it from its optimizer's formula in ``eos_toolkit/thresholds.py`` (2/lr for
  gradient descent, 2(1+beta)/lr for torch's heavy ball and RMSprop's
  momentum, 2(1+beta)/((1+2 beta) lr) for Nesterov, 38/lr for Adam's
  preconditioned sharpness at beta1 = 0.9); VRAdam's moving 38/eta_t is
  dotted, with the band between the two shaded;
- every drawn element carries a ``gid`` naming what it is (``sharpness``,
  ``threshold``, ``threshold_eta``, ``loss``, ``rises``, ``diverged``, ...), so
  that tests and callers can find it;
- non-finite values (a diverged run) are left out of lines; a diverged run is
  marked with an x at its last finite loss.

Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> df = pd.DataFrame({"run_id": "a", "optimizer": "gd", "lr": 0.05, "label": "GD lr=0.05",
    ...                    "step": [0, 0, 10, 10], "metric": ["sharpness", "threshold"] * 2,
    ...                    "value": [5.0, 40.0, 38.0, 40.0]})
    >>> ax = plot_sharpness(df)
    >>> sorted(line.get_gid() for line in ax.lines)
    ['sharpness', 'threshold']
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.derived import damping_ratio, mean_ci_rows, smooth
from analysis.load import as_tidy, metric_series
from analysis.summary import StabilityMetrics, completed, run_info, split_runs, stability_metrics
from eos_toolkit import metrics as names

#: Okabe & Ito (2008), reordered so that the first colours contrast most on white.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")

#: Line styles of the loss figure, by metric.
LOSS_STYLES = {names.TRAIN_LOSS: "-", names.split_metric(names.TRACK, "loss"): "-.",
               names.split_metric(names.VAL, "loss"): "--", names.split_metric(names.TEST, "loss"): ":"}


def _new_axes(figsize=(6.4, 4.0)):
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _colours(df: pd.DataFrame) -> dict[str, str]:
    """run_id -> colour, one colour per label (seeds of one configuration share it)."""
    labels = {rid: run_info(part, rid)["label"] for rid, part in split_runs(df).items()}
    by_label = {label: OKABE_ITO[i % len(OKABE_ITO)] for i, label in enumerate(dict.fromkeys(labels.values()))}
    return {rid: by_label[label] for rid, label in labels.items()}


def _finite(s: pd.Series) -> pd.Series:
    return s[np.isfinite(s.to_numpy())]


def _legend(ax, extra_handles: Sequence = (), above: bool = False) -> None:
    """One legend: a line per label (first occurrence), then style keys; outside when long (or ``above``)."""
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, label in zip(handles, labels):
        seen.setdefault(label, h)
    handles = list(seen.values()) + list(extra_handles)
    if not handles:
        return
    if above:
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=min(3, len(handles)),
                  fontsize="small", frameon=False)
    elif len(handles) > 6:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.8)


def _style_key(ls: str, label: str, marker: str | None = None):
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.35", linestyle=ls, marker=marker, label=label)


def _finish(ax, xlabel: str, ylabel: str, title: str | None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.25, linewidth=0.6)


def plot_sharpness(df, ax=None, normalized: bool | None = None, metric: str | None = None,
                   logy: bool = False, title: str | None = None):
    """Sharpness against step, one line per run, with each run's stability threshold.

    Gradient descent and momentum runs show ``sharpness`` (lambda_1 of the
    Hessian) with ``threshold`` dashed; runs of optimizers with a
    preconditioner (Adam, AdamW, RAdam, RMSprop, VRAdam) show
    ``precond_sharpness`` (lambda_1 of the preconditioned Hessian) with
    ``precond_threshold`` (the recorded threshold: 38/lr for Adam at beta1 = 0.9,
    2/lr for RMSprop) dashed and, for VRAdam, ``precond_threshold_eta``
    (38/eta_t) dotted with the band between shaded. This is the picture of Cohen
    et al. (2021, 2022) and figure 2c of the VRAdam paper.

    ``normalized`` plots sharpness / threshold instead (the edge is the line at
    1; runs without a threshold are left out); by default it is used when the
    runs mix preconditioned and plain sharpness, whose scales differ by orders
    of magnitude. ``metric`` forces one
    sharpness metric for all runs (e.g. ``"sharpness"`` to see the raw Hessian
    of Adam runs); a run's threshold is then drawn only when it logged the
    matching one. The y-axis is cut at twice the largest threshold when a
    diverging run would otherwise flatten everything else.
    """
    df = as_tidy(df)
    parts = split_runs(df)
    pairs: dict[str, StabilityMetrics] = {}
    for rid in parts:
        pair = stability_metrics(parts[rid], rid)
        if metric is not None:
            pre = metric.startswith("precond")
            pair = StabilityMetrics(metric, names.PRECOND_THRESHOLD if pre else names.THRESHOLD,
                                    pair.threshold_eta if (pair and pre) else None)
        if pair is not None and len(_finite(metric_series(parts[rid], pair.sharpness))):
            pairs[rid] = pair
    if not pairs:
        raise ValueError("no run in df logged sharpness (sharpness/threshold or precond_sharpness/precond_threshold)")
    if normalized is None:
        normalized = len({p.preconditioned for p in pairs.values()}) > 1
    ax = ax if ax is not None else _new_axes()
    colours = _colours(df)
    top_threshold, top_value, has_eta = 0.0, 0.0, False
    banded = set()  # labels whose 38/eta_t band is drawn (once: seeds would stack their shading)
    if normalized:
        ax.axhline(1.0, color="0.2", linestyle="--", linewidth=1.1, gid="threshold")
        top_threshold = 1.0
    for rid, pair in pairs.items():
        colour, label = colours[rid], run_info(parts[rid], rid)["label"]
        sharp = _finite(metric_series(parts[rid], pair.sharpness))
        thr = _finite(metric_series(parts[rid], pair.threshold))
        eta_thr = pd.Series(dtype=float)
        if pair.threshold_eta:
            eta_thr = _finite(metric_series(parts[rid], pair.threshold_eta))
        if normalized:
            if not len(thr):
                continue
            common = sharp.index.intersection(thr.index)
            sharp = sharp.loc[common] / thr.loc[common]
            common_eta = eta_thr.index.intersection(thr.index)
            eta_thr = eta_thr.loc[common_eta] / thr.loc[common_eta]
            thr = pd.Series(1.0, index=thr.index)  # drawn once, as the line at 1
        ax.plot(sharp.index, sharp.to_numpy(), color=colour, linewidth=1.4, label=label, gid="sharpness")
        if len(thr) and not normalized:
            ax.plot(thr.index, thr.to_numpy(), color=colour, linestyle="--", linewidth=1.1, gid="threshold")
            top_threshold = max(top_threshold, float(thr.max()))
        if len(eta_thr):
            has_eta = True
            ax.plot(eta_thr.index, eta_thr.to_numpy(), color=colour, linestyle=":", linewidth=1.1, gid="threshold_eta")
            if label not in banded:
                banded.add(label)
                base = thr.reindex(eta_thr.index).to_numpy()
                ax.fill_between(eta_thr.index, base, eta_thr.to_numpy(), color=colour, alpha=0.12, linewidth=0,
                                gid="threshold_band")
            top_threshold = max(top_threshold, float(eta_thr.max()))
        top_value = max(top_value, float(sharp.max()))
    if top_threshold > 0 and top_value > 3 * top_threshold:
        ax.set_ylim(top=2 * top_threshold)
    if logy:
        ax.set_yscale("log")
    preconditioned = {p.preconditioned for p in pairs.values()}
    if normalized:
        ylabel = "sharpness / stability threshold"
    elif preconditioned == {True}:
        ylabel = r"preconditioned sharpness $\lambda_1(P^{-1}H)$"
    elif preconditioned == {False}:
        ylabel = r"sharpness $\lambda_1(H)$"
    else:
        ylabel = r"sharpness $\lambda_1(H)$ or $\lambda_1(P^{-1}H)$"
    if normalized:
        threshold_name = "threshold (ratio 1)"
    else:
        threshold_name = "threshold"
    keys = [_style_key("-", "sharpness"), _style_key("--", threshold_name)]
    if has_eta:
        keys.append(_style_key(":", r"38/$\eta_t$ (VRAdam)"))
    _finish(ax, "step", ylabel, title)
    _legend(ax, keys)
    return ax


def plot_loss(df, ax=None, metrics: Sequence[str] | None = None, logy: bool = True,
              smooth_alpha: float | None = None, mark_rises: bool | None = None, title: str | None = None):
    """Loss against step, one line per run and metric, with the loss's rises marked.

    ``metrics`` defaults to those of train_loss, track_loss, val_loss, test_loss
    that were logged (solid, dash-dot, dashed, dotted). ``mark_rises`` draws a
    rug of ticks along the bottom, one row per label (its first completed run), at the
    steps where train_loss went up: dense ticks are the oscillation of the edge
    of stability; by default it is drawn for up to 6 labels. A diverged run gets
    an x on the top edge at its last step, and the y-axis is cut at 3x the
    largest loss of the other runs when the diverged one would flatten them.
    ``smooth_alpha`` applies an EMA (:func:`analysis.derived.smooth`) to the
    lines (the rug uses raw values). With ``logy`` non-positive values are left out.
    """
    df = as_tidy(df)
    logged = set(df["metric"])
    metrics = [m for m in (metrics or LOSS_STYLES) if m in logged]
    if not metrics:
        raise ValueError(f"df has none of the loss metrics {list(LOSS_STYLES)}; it has {sorted(logged)}")
    ax = ax if ax is not None else _new_axes()
    colours = _colours(df)
    parts = split_runs(df)
    infos = {rid: run_info(part, rid) for rid, part in parts.items()}
    # The run whose rises stand for its label in the rug: its first completed run, else its first.
    rug_run = {}
    for rid in sorted(parts, key=lambda r: not completed(infos[r].get("status"))):
        rug_run.setdefault(infos[rid]["label"], rid)
    rug_rows = [rug_run[label] for label in dict.fromkeys(info["label"] for info in infos.values())]
    if mark_rises is None:
        mark_rises = len(rug_rows) <= 6
    rug_height = min(0.035, 0.15 / len(rug_rows))
    top_ok, top_diverged = 0.0, 0.0
    for rid in parts:
        info, colour = infos[rid], colours[rid]
        diverged = info.get("status") == "diverged"
        for m in metrics:
            raw = metric_series(parts[rid], m)
            s = smooth(raw, alpha=smooth_alpha) if smooth_alpha else raw
            s = _finite(s)
            if logy:
                s = s[s > 0]
            if not len(s):
                continue
            ax.plot(s.index, s.to_numpy(), color=colour, linestyle=LOSS_STYLES.get(m, "-"), linewidth=1.2,
                    label=info["label"], gid="loss")
            if diverged:
                top_diverged = max(top_diverged, float(s.max()))
            else:
                top_ok = max(top_ok, float(s.max()))
        train = metric_series(parts[rid], names.TRAIN_LOSS)
        if mark_rises and rid in rug_rows and len(train) > 1:
            rises = np.diff(train.to_numpy())
            rose = train.index[1:][np.isfinite(rises) & (rises > 0)]
            if len(rose):
                ax.plot(rose, np.full(len(rose), (rug_rows.index(rid) + 0.5) * rug_height), linestyle="none", marker="|",
                        markersize=4, color=colour, alpha=0.7, transform=ax.get_xaxis_transform(), gid="rises")
        if diverged and len(train):
            ax.plot([train.index[-1]], [0.97], linestyle="none", marker="x", markersize=8, markeredgewidth=2,
                    color=colour, transform=ax.get_xaxis_transform(), clip_on=False, gid="diverged")
    if logy:
        ax.set_yscale("log")
    if top_ok > 0 and top_diverged > 10 * top_ok:
        ax.set_ylim(top=3 * top_ok)
    keys = [_style_key(LOSS_STYLES.get(m, "-"), m.replace("_", " ")) for m in metrics] if len(metrics) > 1 else []
    if any(line.get_gid() == "rises" for line in ax.lines):
        keys.append(_style_key("none", "train loss rose (rug)", marker="|"))
    if any(line.get_gid() == "diverged" for line in ax.lines):
        keys.append(_style_key("none", "diverged (last step)", marker="x"))
    _finish(ax, "step", "loss" if len(metrics) > 1 else metrics[0].replace("_", " "), title)
    _legend(ax, keys)
    return ax


GFLOWNET_STYLES = {names.L1_EXACT: "-", names.L1_EMPIRICAL: "--"}


def plot_distribution_error(df, ax=None, metrics: Sequence[str] = (names.L1_EXACT, names.L1_EMPIRICAL), logy: bool = True,
                            title: str | None = None):
    """A GFlowNet's distance to its target R/Z against step, one colour per run.

    ``l1_exact`` (solid): L1 distance of the policy's exact terminal
    distribution; ``l1_empirical`` (dashed): of the last samples drawn in
    training (the ``gflownet`` task's metrics; ``kl_exact`` / ``kl_empirical``
    can be passed as ``metrics`` too). Comparing optimizers on one axis is the
    point: the lower line learned the target distribution faster.
    """
    df = as_tidy(df)
    logged = set(df["metric"])
    metrics = [m for m in metrics if m in logged]
    if not metrics:
        raise ValueError(f"df has none of the metrics {list(GFLOWNET_STYLES)}; it has {sorted(logged)}")
    ax = ax if ax is not None else _new_axes()
    colours = _colours(df)
    for rid, part in split_runs(df).items():
        info = run_info(part, rid)
        for m in metrics:
            s = _finite(metric_series(part, m))
            if logy:
                s = s[s > 0]
            if len(s):
                ax.plot(s.index, s.to_numpy(), color=colours[rid], linestyle=GFLOWNET_STYLES.get(m, ":"),
                        linewidth=1.2, label=info["label"], gid=m)
    if logy:
        ax.set_yscale("log")
    keys = [_style_key(GFLOWNET_STYLES.get(m, ":"), m.replace("_", " ")) for m in metrics] if len(metrics) > 1 else []
    _finish(ax, "step", "distance to the target R/Z" if len(metrics) > 1 else metrics[0].replace("_", " "), title)
    _legend(ax, keys)
    return ax


def _alpha1(info: dict) -> float | None:
    # VRAdam's clamp alpha1 from the config, wherever the training loop nested it.
    for key, value in info.items():
        if re.fullmatch(r"(.*\.)?alpha1", str(key)) and isinstance(value, (int, float)) and not pd.isna(value):
            return float(value)
    return None


def damping_runs(df) -> list[str]:
    """The runs that logged VRAdam's gate: ``eta`` and ``lr``, and ``vr_clamped`` or ``vr_sq_norm``."""
    out = []
    for rid, part in split_runs(df).items():
        logged = set(part["metric"])
        if {names.ETA, names.LR} <= logged and logged & {names.VR_CLAMPED, names.VR_SQ_NORM}:
            out.append(rid)
    return out


def plot_damping(df, ax=None, show_sq_norm: bool = True, title: str | None = None):
    """VRAdam's damping: eta_t / lr against step, clamp-active shading, squared velocity norm.

    eta_t / lr = 1 / (1 + min(beta3 s_t, alpha1)): 1 is plain Adam(W), the dashed
    floor 1/(1 + alpha1) (drawn when the config names alpha1) is the clamp.
    Steps with the clamp active are shaded in the run's colour (one horizontal
    strip per run when several runs share the axes). ``show_sq_norm`` adds s_t
    (``vr_sq_norm``) on a log-scale right-hand axis, thin and translucent.
    Only runs from :func:`damping_runs` are drawn; ValueError if there are none.
    """
    df = as_tidy(df)
    parts = split_runs(df)
    ids = damping_runs(df)
    if not ids:
        raise ValueError("no run in df logged VRAdam's damping (eta and lr, with vr_clamped or vr_sq_norm)")
    ax = ax if ax is not None else _new_axes()
    colours = _colours(df)
    twin = None
    floors = set()
    for i, rid in enumerate(ids):
        info, colour = run_info(parts[rid], rid), colours[rid]
        ratio = _finite(damping_ratio(metric_series(parts[rid], names.ETA), metric_series(parts[rid], names.LR)))
        ax.plot(ratio.index, ratio.to_numpy(), color=colour, linewidth=1.8, label=info["label"], gid="eta_over_lr")
        clamped = metric_series(parts[rid], names.VR_CLAMPED)
        if (clamped >= 0.5).any():
            lo, hi = i / len(ids), (i + 1) / len(ids)
            ax.fill_between(clamped.index, lo, hi, where=clamped.to_numpy() >= 0.5, step="post", color=colour,
                            alpha=0.15, linewidth=0, transform=ax.get_xaxis_transform(), gid="clamp")
        alpha1 = _alpha1(info)
        if alpha1 is not None and alpha1 not in floors:
            floors.add(alpha1)
            ax.axhline(1 / (1 + alpha1), color="0.4", linestyle="--", linewidth=0.9, gid="floor")
        sq = _finite(metric_series(parts[rid], names.VR_SQ_NORM))
        sq = sq[sq > 0]
        if show_sq_norm and len(sq):
            twin = twin or ax.twinx()
            twin.plot(sq.index, sq.to_numpy(), color=colour, linestyle="-.", linewidth=0.8, alpha=0.6,
                      gid="vr_sq_norm")
    ax.set_ylim(0, 1.08)
    keys = []
    if any(c.get_gid() == "clamp" for c in ax.collections):
        from matplotlib.patches import Patch

        keys.append(Patch(color="0.5", alpha=0.3, label="clamp active"))
    if floors:
        keys.append(_style_key("--", r"floor $1/(1+\alpha_1)$"))
    if twin is not None:
        twin.set_yscale("log")
        twin.set_ylabel(r"squared velocity norm $s_t$ (dash-dot)")
        keys.append(_style_key("-.", r"$s_t$ (right axis)"))
    _finish(ax, "step", r"effective rate $\eta_t$ / lr", title)
    _legend(ax, keys, above=True)
    return ax


def plot_spectrum(df, ax=None, run_id: str | None = None, k: int | None = None, precond: bool = False,
                  title: str | None = None):
    """The top-k Hessian eigenvalues (``hessian_eig_1..k``) of one run against step, with its threshold.

    ``precond`` uses ``precond_eig_i`` and ``precond_threshold`` instead.
    ``run_id`` may be omitted when df holds one run. Eigenvalue 1 is the darkest line.
    """
    parts = split_runs(df)
    if run_id is None:
        if len(parts) != 1:
            raise ValueError(f"df holds {len(parts)} runs; pass run_id, one of {list(parts)}")
        run_id = next(iter(parts))
    if run_id not in parts:
        raise ValueError(f"no run {run_id!r} in df; runs are {list(parts)}")
    df = parts[run_id]
    solve = names.PRECOND if precond else names.HESSIAN
    indices = (names.eigenvalue_index(solve, m) for m in set(df["metric"]))
    found = sorted(i for i in indices if i is not None and (k is None or i <= k))
    if not found:
        raise ValueError(f"run {run_id!r} logged no {names.eigenvalue(solve, '<i>')} metrics")
    import matplotlib

    ax = ax if ax is not None else _new_axes()
    cmap = matplotlib.colormaps["viridis"]
    for j, i in enumerate(found):
        s = _finite(metric_series(df, names.eigenvalue(solve, i)))
        colour = cmap(0.85 * j / max(1, len(found) - 1))
        ax.plot(s.index, s.to_numpy(), color=colour, linewidth=1.2, label=rf"$\lambda_{{{i}}}$", gid="eigenvalue")
    thr = _finite(metric_series(df, names.PRECOND_THRESHOLD if precond else names.THRESHOLD))
    keys = []
    if len(thr):
        ax.plot(thr.index, thr.to_numpy(), color="0.2", linestyle="--", linewidth=1.1, gid="threshold")
        keys.append(_style_key("--", "threshold"))
    label = run_info(df, run_id)["label"]
    what = "preconditioned Hessian" if precond else "Hessian"
    _finish(ax, "step", f"top {len(found)} eigenvalues of the {what}", title or label)
    _legend(ax, keys)
    return ax


def plot_density(density: pd.DataFrame, ax=None, run_id: str | None = None, kind: str = "heatmap",
                 threshold: float | None = None, log: bool = True, decades: float = 8.0, max_curves: int = 8,
                 title: str | None = None):
    """A run's spectral density over time, from ``Run.density`` / ``Runs.density``.

    ``kind="heatmap"``: step on x, eigenvalue on y, colour = density (the curves
    are interpolated onto one eigenvalue grid). ``kind="lines"``: up to
    ``max_curves`` curves, evenly spaced in time, stacked with a vertical offset
    (later steps higher, coloured from dark to light). With ``log`` the density
    is shown as log10, clipped ``decades`` below its peak: the outliers that
    carry the sharpness hold a tiny fraction of the mass (about 1/n_params
    each, 5 to 6 decades below the bulk for a 200k-parameter MLP) and vanish
    on a linear scale or with a shallower clip. ``threshold`` draws the stability threshold (horizontal in the heat
    map, vertical for lines).
    """
    if kind not in ("heatmap", "lines"):
        raise ValueError(f"kind must be 'heatmap' or 'lines', got {kind!r}")
    if not decades > 0:
        raise ValueError(f"decades must be > 0, got {decades}")
    density = density if isinstance(density, pd.DataFrame) else density.density
    if "run_id" in density.columns:
        ids = list(dict.fromkeys(density["run_id"]))
        if run_id is None and len(ids) > 1:
            raise ValueError(f"density holds {len(ids)} runs; pass run_id, one of {ids}")
        if run_id is not None:
            density = density[density["run_id"] == run_id]
    density = density[np.isfinite(density["eigenvalue"]) & np.isfinite(density["density"])]
    if not len(density):
        raise ValueError("no spectral-density curves to plot")
    import matplotlib

    peak = float(density["density"].max())
    floor = peak * 10.0**-decades if peak > 0 else 1e-12

    def shown(d):
        return np.log10(np.maximum(d, floor)) if log else np.asarray(d, dtype=float)

    ax = ax if ax is not None else _new_axes()
    steps = sorted(density["step"].unique())
    curves = {s: g.sort_values("eigenvalue") for s, g in density.groupby("step")}
    what = "log10 density" if log else "density"
    if kind == "heatmap":
        grid = np.linspace(density["eigenvalue"].min(), density["eigenvalue"].max(), 200)
        z = np.column_stack([np.interp(grid, curves[s]["eigenvalue"], curves[s]["density"], left=0.0, right=0.0)
                             for s in steps])
        mesh = ax.pcolormesh(np.asarray(steps, dtype=float), grid, shown(z), shading="nearest", cmap="viridis",
                             gid="density")
        ax.figure.colorbar(mesh, ax=ax, label=what)
        if threshold is not None:
            ax.axhline(threshold, color="white", linestyle="--", linewidth=1.1, gid="threshold")
        _finish(ax, "step", "eigenvalue", title)
        ax.grid(False)
        return ax
    chosen = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(max_curves, len(steps)))]
    chosen = list(dict.fromkeys(chosen))
    offset = 1.1 * (decades if log else peak)
    cmap = matplotlib.colormaps["viridis"]
    for j, s in enumerate(chosen):
        c = curves[s]
        y = shown(c["density"].to_numpy()) - (np.log10(floor) if log else 0.0)
        ax.plot(c["eigenvalue"], y + j * offset, color=cmap(0.85 * j / max(1, len(chosen) - 1)),
                linewidth=1.1, label=f"step {s}", gid="density")
    keys = []
    if threshold is not None:
        ax.axvline(threshold, color="0.3", linestyle="--", linewidth=1.0, gid="threshold")
        keys.append(_style_key("--", "threshold"))
    _finish(ax, "eigenvalue", f"{what} (curves offset by step)", title)
    ax.set_yticks([])
    _legend(ax, keys)
    return ax


def plot_comparison(df, metric: str = names.TRAIN_LOSS, ax=None, group_by: Sequence[str] = ("optimizer", "lr"),
                    confidence: float = 0.95, logy: bool = True, smooth_alpha: float | None = None,
                    title: str | None = None):
    """Mean of ``metric`` across seeds with a confidence band, one line per group (optimizer and lr).

    At each step the mean and the Student-t interval are taken over the runs of
    the group with a finite value there; the band is drawn where at least two
    runs contribute. With ``logy`` both are computed on log10(value) (a
    geometric mean, multiplicative band), which keeps the band positive for
    losses spanning decades. Only completed runs are averaged (as in
    :func:`analysis.summary_table`: diverged and unfinished runs are left out
    and counted in the legend). ``smooth_alpha``
    smooths each run (EMA) before averaging.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    df = as_tidy(df)
    keys = [k for k in group_by if k in df.columns]
    if not keys:
        raise ValueError(f"none of the group_by columns {list(group_by)} is in df")
    rows = df[df["metric"] == metric]
    if not len(rows):
        raise ValueError(f"no run in df logged {metric!r}")
    ax = ax if ax is not None else _new_axes()
    colours = _colours(df)
    parts = split_runs(df)
    for key, group in rows.groupby(keys, sort=True, dropna=False):
        ids = list(dict.fromkeys(group["run_id"]))
        ok = [r for r in ids if completed(run_info(parts[r], r).get("status"))]
        series = {}
        for rid in ok:
            s = metric_series(parts[rid], metric)
            s = smooth(s, alpha=smooth_alpha) if smooth_alpha else s
            s = s.where(np.isfinite(s.to_numpy()))
            if logy:
                s = np.log10(s.where(s > 0))
            series[rid] = s
        if not series:
            continue
        table = pd.DataFrame(series).sort_index()
        mean, half, _ = mean_ci_rows(table.to_numpy(dtype=float), confidence)
        x = table.index.to_numpy()
        lo, hi = mean - half, mean + half
        if logy:
            mean, lo, hi = 10**mean, 10**lo, 10**hi
        key = key if isinstance(key, tuple) else (key,)
        labels = {run_info(parts[r], r)["label"] for r in ids}
        name = labels.pop() if len(labels) == 1 else ", ".join(f"{k}={v}" for k, v in zip(keys, key))
        note = f"n={len(ok)}" + (f", {len(ids) - len(ok)} left out" if len(ok) < len(ids) else "")
        colour = colours[ids[0]]
        ax.plot(x, mean, color=colour, linewidth=1.4, label=f"{name} ({note})", gid="mean")
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0, gid="band")
    if logy:
        ax.set_yscale("log")
    pct = f"{100 * confidence:g}%"
    _finish(ax, "step", metric.replace("_", " ") + (" (geometric mean)" if logy else " (mean)"), title)
    _legend(ax, [_band_key(pct)])
    return ax


def _band_key(pct: str):
    from matplotlib.patches import Patch

    return Patch(color="0.5", alpha=0.3, label=f"{pct} CI over seeds")


__all__ = ["OKABE_ITO", "plot_sharpness", "plot_loss", "plot_damping", "plot_spectrum", "plot_density",
           "plot_comparison", "damping_runs"]
