"""analysis: run records -> pandas DataFrames -> matplotlib figures and reports.

Reads only the run-record format (:mod:`eos_toolkit.record`); never imports
torch, so a record copied to a laptop can be plotted there. matplotlib is
imported when a figure is first drawn.

- loading: :func:`load_run`, :func:`load_runs`, :func:`wide`, :func:`metric_series`
- derived quantities: :mod:`analysis.derived` (threshold crossing, time above,
  oscillation measures, VRAdam damping, smoothing, steps to target, mean and CI)
- tables: :func:`stability_summary`, :func:`run_summary`, :func:`summary_table`
- figures: ``plot_sharpness``, ``plot_loss``, ``plot_damping``, ``plot_spectrum``,
  ``plot_density``, ``plot_comparison`` (each ``plot_*(df, ax=None, ...) -> Axes``)
- the central flow beside its run: :func:`flow_agreement`, :func:`flow_table`,
  :func:`plot_flow` (:mod:`analysis.flow`)
- files: :func:`save_figures` (PNG + PDF), :func:`write_report` (markdown + PNGs)

Example:
    >>> import analysis
    >>> runs = analysis.load_runs("runs/")                      # doctest: +SKIP
    >>> ax = analysis.plot_sharpness(runs.df)                   # doctest: +SKIP
    >>> analysis.write_report("runs/", "report/")              # doctest: +SKIP
"""

from analysis.derived import (
    clamp_fraction,
    damping_ratio,
    first_crossing_step,
    loss_rise_fraction,
    mean_ci,
    mean_update_cos,
    sharpness_ratio,
    sign_flip_rate,
    smooth,
    steps_above_threshold,
    steps_to_target,
)
from analysis.flow import AVERAGE_WINDOW, flow_agreement, flow_agreement_table, flow_table, plot_flow
from analysis.load import (
    Run,
    Runs,
    flatten_config,
    load_run,
    load_runs,
    metric_series,
    run_label,
    wide,
)
from analysis.plots import (
    OKABE_ITO,
    damping_runs,
    plot_comparison,
    plot_damping,
    plot_density,
    plot_distribution_error,
    plot_loss,
    plot_sharpness,
    plot_spectrum,
)
from analysis.report import DEFAULT_KINDS, FIGURE_KINDS, save_figures, write_report
from analysis.summary import (
    format_summary,
    markdown_table,
    run_summary,
    stability_metrics,
    stability_summary,
    summary_table,
)

__all__ = [
    "AVERAGE_WINDOW", "DEFAULT_KINDS", "FIGURE_KINDS", "OKABE_ITO", "Run", "Runs",
    "clamp_fraction", "damping_ratio", "damping_runs", "first_crossing_step", "flatten_config",
    "flow_agreement", "flow_agreement_table", "flow_table", "format_summary", "load_run", "load_runs", "loss_rise_fraction", "markdown_table",
    "mean_ci", "mean_update_cos", "metric_series", "plot_comparison", "plot_damping", "plot_density",
    "plot_distribution_error", "plot_flow", "plot_loss", "plot_sharpness", "plot_spectrum", "run_label", "run_summary", "save_figures",
    "sharpness_ratio", "sign_flip_rate", "smooth", "stability_metrics", "stability_summary",
    "steps_above_threshold", "steps_to_target", "summary_table", "wide", "write_report",
]
