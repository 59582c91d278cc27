"""Figure files and reports.

:func:`save_figures` writes each requested figure as PNG (200 dpi) and PDF;
:func:`write_report` writes a report as **markdown plus PNGs**: ``report.md``
with the figures beside it in ``figures/`` (relative links), so the directory
can be zipped, committed, or opened in any markdown viewer. Neither needs a
display: figures are built with :class:`matplotlib.figure.Figure`, not pyplot.

Example:
    >>> paths = save_figures("runs/", "figures/", kinds=("sharpness", "loss"))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from analysis.flow import AVERAGE_WINDOW, flow_agreement_table, has_flow, plot_flow
from analysis.load import Run, Runs, flatten_config, load_runs
from analysis.plots import (
    LOSS_STYLES,
    damping_runs,
    plot_comparison,
    plot_damping,
    plot_density,
    plot_distribution_error,
    plot_loss,
    plot_sharpness,
    plot_spectrum,
)
from analysis.summary import (
    format_summary,
    markdown_table,
    run_summary,
    stability_metrics,
    stability_summary,
    summary_table,
)
from eos_toolkit import metrics as names

log = logging.getLogger("analysis")


def _as_runs(runs) -> Runs:
    if isinstance(runs, Runs):
        return runs
    if isinstance(runs, Run):
        return Runs([runs])
    return load_runs(runs)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "run"


def _figure(figsize=(6.4, 4.0), panels: int = 1):
    from matplotlib.figure import Figure

    if panels == 1:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    fig = Figure(figsize=(figsize[0] * panels * 0.8, figsize[1]), layout="constrained")
    return fig, list(fig.subplots(1, panels))


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str], dpi: int) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi, format=fmt)
        paths.append(path)
    return paths


def _group_keys(df: pd.DataFrame) -> list[str]:
    # Optimizer and lr, as the config contract promises; the label for records without them.
    return [k for k in ("optimizer", "lr") if k in df.columns] or ["label"]


def _spectrum_solve(run: Run) -> str | None:
    # Runs of optimizers with a preconditioner are judged on the preconditioned Hessian, when it was tracked.
    for solve in (names.PRECOND, names.HESSIAN):
        if any(names.eigenvalue_index(solve, m) is not None for m in run.metrics):
            return solve
    return None


def _last_threshold(run: Run) -> float | None:
    values = run.metric(names.THRESHOLD).dropna()
    return float(values.iloc[-1]) if len(values) else None


@dataclass(frozen=True)
class FigureKind:
    """One kind of figure :func:`save_figures` writes.

    ``shows(run)``: whether a run has what the figure draws; ``missing``: what
    is said when no run has it.  A figure of all runs (``per_run=False``,
    ``<kind>.png``) is drawn by ``draw(df, ax)`` on the tidy frame of every
    run; a figure per run (``<kind>_<run_id>.png``) by ``draw(run, ax)`` for
    each run that shows it.
    """

    shows: Callable[[Run], bool]
    missing: str
    draw: Callable
    per_run: bool = False
    panels: int = 1  # side by side; draw gets a list of axes when more than one


def _logged(*metrics: str) -> Callable[[Run], bool]:
    return lambda run: bool(set(metrics) & set(run.metrics))


#: Every figure kind, in the order they are written; "all" means every one of them.
FIGURES: dict[str, FigureKind] = {
    "sharpness": FigureKind(lambda run: bool(stability_metrics(run.df, run.run_id)),
                            "no run logged sharpness with its threshold",
                            lambda df, ax: plot_sharpness(df, ax=ax)),
    "loss": FigureKind(_logged(*LOSS_STYLES), "no run logged a loss",
                       lambda df, ax: plot_loss(df, ax=ax)),
    "damping": FigureKind(lambda run: bool(damping_runs(run.df)),
                          "no VRAdam run (no eta with vr_clamped or vr_sq_norm logged)",
                          lambda df, ax: plot_damping(df, ax=ax)),
    "spectrum": FigureKind(lambda run: _spectrum_solve(run) is not None,
                           "no run logged hessian_eig_<i> or precond_eig_<i>",
                           lambda run, ax: plot_spectrum(run.df, ax=ax, precond=_spectrum_solve(run) == names.PRECOND),
                           per_run=True),
    "density": FigureKind(lambda run: len(run.density) > 0, "no run logged a spectral density",
                          lambda run, ax: plot_density(run.density, ax=ax, threshold=_last_threshold(run),
                                                       title=run.label),
                          per_run=True),
    "comparison": FigureKind(_logged(names.TRAIN_LOSS), "no run logged train_loss",
                             lambda df, ax: plot_comparison(df, ax=ax, group_by=_group_keys(df))),
    "gflownet": FigureKind(_logged(names.L1_EXACT, names.L1_EMPIRICAL),
                           "no GFlowNet run (no l1_exact or l1_empirical logged)",
                           lambda df, ax: plot_distribution_error(df, ax=ax)),
    "flow": FigureKind(has_flow, "no run holds a central flow (eos flow RUN_DIR writes one)",
                       lambda run, axes: plot_flow(run, axes), per_run=True, panels=3),
}
FIGURE_KINDS = tuple(FIGURES)
DEFAULT_KINDS = ("sharpness", "loss", "damping", "spectrum", "gflownet")  # what eos plot and reports draw


def save_figures(runs, out_dir: str | os.PathLike, kinds: Iterable[str] = DEFAULT_KINDS,
                 formats: Sequence[str] = ("png", "pdf"), dpi: int = 200) -> list[Path]:
    """Write the figures of ``kinds`` for ``runs`` into ``out_dir``; return the paths written.

    ``runs`` is a :class:`Runs`, a :class:`Run`, or what :func:`load_runs` takes.
    Kinds (:data:`FIGURES`): ``sharpness``, ``loss``, ``damping`` (VRAdam runs),
    ``comparison`` (train loss mean and CI by optimizer and lr) and ``gflownet``
    draw all runs in one figure (``<kind>.png``); ``spectrum`` and ``density``
    draw one figure per run (``<kind>_<run_id>.png``; the preconditioned
    spectrum for Adam-family runs that tracked it) and ``flow`` (three panels
    per run that holds a central flow: loss, sharpness, oscillation, from
    :mod:`analysis.flow`); ``"all"`` means every kind.
    A kind the runs have no data for (damping without a VRAdam run, spectrum
    without ``hessian_eig_i``, ...) is skipped with a warning on the
    ``analysis`` logger naming it.
    """
    kinds = list(FIGURES) if "all" in kinds else list(kinds)
    unknown = [k for k in kinds if k not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure kinds {unknown}; choose from {list(FIGURES)}")
    if not 72 <= dpi <= 1200:
        raise ValueError(f"dpi must be in [72, 1200], got {dpi}")
    runs = _as_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for kind in kinds:
        figure = FIGURES[kind]
        showing = [run for run in runs if figure.shows(run)]
        if not showing:
            log.warning("skipped the %s figure: %s", kind, figure.missing)
            continue
        if figure.per_run:
            for run in showing:
                fig, ax = _figure(panels=figure.panels)
                figure.draw(run, ax)
                written += _save(fig, out_dir, f"{kind}_{_safe(run.run_id)}", formats, dpi)
        else:
            fig, ax = _figure()
            figure.draw(runs.df, ax)
            written += _save(fig, out_dir, kind, formats, dpi)
    return written


def _table(df: pd.DataFrame) -> str:
    return markdown_table(df) if len(df) else "_No metrics logged yet._"


def _json_block(obj) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```"


def _events_line(run: Run) -> str:
    if not run.events:
        return "no events"
    return ", ".join(f"{e.get('event')} at step {e.get('step')}" for e in run.events)


def write_report(run_dirs, out_dir: str | os.PathLike, target_loss: float | None = None,
                 title: str = "Edge-of-stability report") -> Path:
    """Write ``report.md`` with its figures in ``out_dir/figures``; return the report's path.

    Sections: an overview of the runs (status, last step); the stability
    summary (first crossing of the threshold, time above it, oscillation and
    VRAdam damping measures, see :func:`analysis.stability_summary`); the
    figures (sharpness, loss, damping, spectrum, density, whatever the runs
    logged); the outcomes per run and, when several runs are given, the
    comparison across seeds (mean ± 95% CI by optimizer and lr, with its
    figure); the central flow's agreement for runs that hold one (``eos
    flow``); then each run's config, environment and events.
    ``run_dirs`` is anything :func:`load_runs` takes (or a :class:`Runs`).
    """
    runs = _as_runs(run_dirs)
    df = runs.df
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = ["sharpness", "loss", "damping", "spectrum", "density"]
    several = len(runs) > 1
    if several:
        kinds.append("comparison")
    flows = [run for run in runs if has_flow(run)]
    if flows:
        kinds.append("flow")
    pngs = save_figures(runs, fig_dir, kinds=kinds, formats=("png",))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    lines = [f"# {title}", "", f"{len(runs)} run(s), written {now}.", "", "## Runs", ""]
    overview = runs.overview[["run_id", "label", "status", "last_step", "diverged_step"]]
    lines += [markdown_table(overview), ""]

    stab = stability_summary(df).drop(columns=["label", "status"])
    stab = stab.dropna(axis=1, how="all")
    lines += ["## Stability", "",
              "`late_ratio` is the median sharpness / threshold over the last half of the measurements "
              "(about 1 at the edge of stability); `loss_rise_fraction` the fraction of steps where the "
              "training loss rose; `sign_flip_rate` how often the update along the top eigenvector changed "
              "sign; `clamp_fraction` how often VRAdam's gate was clamped.", "",
              _table(stab), ""]

    lines += ["## Figures", ""]
    if not pngs:
        lines += ["_No figures: the runs logged nothing to plot yet._", ""]
    for png in pngs:
        lines += [f"![{png.stem}](figures/{png.name})", ""]

    per_run = run_summary(df, target_loss=target_loss).dropna(axis=1, how="all")
    lines += ["## Outcomes per run", "", _table(per_run), ""]
    if several and len(per_run):
        table = format_summary(summary_table(df, group_by=_group_keys(df), target_loss=target_loss))
        lines += ["## Comparison", "",
                  "Mean ± half-width of the 95% Student-t interval over the seeds of each optimizer and rate; "
                  "diverged and unfinished runs are counted, not averaged"
                  + (f"; `reached`: runs whose loss got to {target_loss:g}." if target_loss is not None else "."),
                  "", markdown_table(table), ""]

    if flows:
        lines += ["## Central flow", "",
                  "Over each run's edge phase (the steps at which its flow had an eigenvalue at the threshold): "
                  "the flow's predicted loss L + tr(H Sigma)/2 against the real loss averaged over a centred "
                  f"window of {AVERAGE_WINDOW} steps (relative error: median, 90th percentile, and of the means "
                  "over the phase), the flow's and the run's sharpness / threshold, the measured squared "
                  "displacement from the flow along its top oscillation direction over the predicted variance "
                  "(ratio of the means over the phase), and the flow's cost per unit of time against the "
                  "replayed step's (analysis.flow_agreement).", "",
                  markdown_table(flow_agreement_table(flows)), ""]

    lines += ["## Runs in detail", ""]
    for run in runs:
        lines += [f"### {run.run_id}", "", f"- label: {run.label}", f"- status: **{run.status}**",
                  f"- directory: `{run.run_dir}`", f"- events: {_events_line(run)}", "",
                  "Config:", "", markdown_table(pd.DataFrame(list(flatten_config(run.config).items()),
                                                             columns=["key", "value"]), digits=12),
                  "", "Environment:", "", _json_block(run.environment), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
