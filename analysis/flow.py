"""The central flow beside its run: how well it predicted, in numbers, and the figure.

``eos flow RUN_DIR`` writes the flow's ``flow_*`` metrics into the run's
record (:mod:`eos_toolkit.metrics`).  :func:`flow_agreement` reduces them
with the run's own measurements to the figures of merit, over the edge
phase (the steps at which the flow had an eigenvalue at its threshold):

- loss: the relative error of the flow's predicted loss ``L(w) + 1/2 tr(H Sigma)``
  against the real train loss averaged over a centred window of
  :data:`AVERAGE_WINDOW` steps (whole windows only; median, 90th
  percentile, max), and of its
  mean over the phase against the real loss's mean; the same for the
  flow's plain ``L(w)``, which leaves the oscillation's share out;
- sharpness: the flow's ``lambda_1 / threshold`` (held at 1 by design) and
  the run's measured ratio at its tracking steps (mean and standard
  deviation): raw for gradient descent, preconditioned for the adaptive
  rules, against ``38/eta_t`` for VRAdam;
- oscillation: the measured squared displacement of the real iterate from
  the flow along the predicted top direction, averaged over the same
  window, divided by the predicted variance (median and quartiles: 1 is a
  perfect prediction), and the ratio of their means over the phase;
- VRAdam's gate: the flow's rate against the run's ``eta_t`` (relative
  error, median and max) and where each dips lowest;
- cost: seconds and products per unit of flow time against the replayed
  optimizer step's seconds.

Example:
    >>> flow_agreement(load_run("runs/gd"))["loss_error_median"]    # doctest: +SKIP
    0.012
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.derived import smooth
from analysis.load import Run
from eos_toolkit import metrics as names

#: steps in the centred window over which the real loss and displacement are averaged
AVERAGE_WINDOW = 21

#: what a flow rule's sharpness is compared with in the run's own record: (sharpness, threshold)
REAL_SHARPNESS = {
    "gd": (names.SHARPNESS, names.THRESHOLD),
    "rmsprop": (names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD),
    "adam": (names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD),
    "vradam": (names.PRECOND_SHARPNESS, names.at_eta(names.PRECOND_THRESHOLD)),
}


def flow_rule(run: Run) -> str | None:
    """The flow rule named by the run's last ``flow_started`` event (None: no flow recorded)."""
    started = [e for e in run.events if e.get("event") == "flow_started"]
    return started[-1].get("rule") if started else None


def has_flow(run: Run) -> bool:
    return names.FLOW_LOSS in run.metrics


def _quantiles(values: pd.Series, *qs: float) -> list[float]:
    v = values.replace([np.inf, -np.inf], np.nan).dropna()
    return [float(v.quantile(q)) if len(v) else math.nan for q in qs]


def flow_table(run: Run, window: int = AVERAGE_WINDOW) -> pd.DataFrame:
    """Per step: the real loss and its centred average, and the flow's metrics (one column each)."""
    if not has_flow(run):
        raise ValueError(f"{run.run_id} holds no central flow: run eos flow on it first")
    loss = run.metric(names.TRAIN_LOSS)
    columns = {names.TRAIN_LOSS: loss, "averaged_loss": _full_windows(loss, window)}
    for metric in run.metrics:
        if names.is_flow_metric(metric):
            columns[metric] = run.metric(metric)
    table = pd.DataFrame(columns)
    table = table[table[names.FLOW_LOSS].notna()]
    if names.FLOW_DISPLACEMENT_TOP in table:
        table["averaged_displacement_top"] = _full_windows(table[names.FLOW_DISPLACEMENT_TOP], window)
    return table


def _full_windows(series: pd.Series, window: int) -> pd.Series:
    """The centred average where the whole window lies inside the series (NaN near its ends)."""
    averaged = smooth(series, method="centered", window=window)
    complete = series.notna().astype(float).rolling(window, center=True, min_periods=window).sum() == window
    return averaged.where(complete)


def flow_agreement(run: Run, window: int = AVERAGE_WINDOW) -> dict[str, float]:
    """The figures of merit of the run's central flow (module docstring); NaN where a quantity is absent."""
    table = flow_table(run, window)
    edge = table[table[names.FLOW_EDGE_COUNT] > 0]
    out: dict[str, float] = {"steps": float(len(table)), "edge_steps": float(len(edge)),
                             "edge_onset": float(edge.index[0]) if len(edge) else math.nan}
    rel = ((edge[names.FLOW_PREDICTED_LOSS] - edge["averaged_loss"]) / edge["averaged_loss"]).abs()
    plain = ((edge[names.FLOW_LOSS] - edge["averaged_loss"]) / edge["averaged_loss"]).abs()
    out["loss_error_median"], out["loss_error_p90"], out["loss_error_max"] = _quantiles(rel, 0.5, 0.9, 1.0)
    real_mean = float(edge[names.TRAIN_LOSS].mean()) if len(edge) else math.nan
    out["loss_error_of_means"] = float(edge[names.FLOW_PREDICTED_LOSS].mean()) / real_mean - 1 if len(edge) \
        else math.nan
    out["plain_loss_error_median"], out["plain_loss_error_p90"] = _quantiles(plain, 0.5, 0.9)
    held = edge[names.FLOW_SHARPNESS] / edge[names.FLOW_THRESHOLD]
    out["flow_sharpness_ratio_mean"] = float(held.mean()) if len(held) else math.nan
    out["flow_sharpness_ratio_max"] = float(held.max()) if len(held) else math.nan
    sharp, thresh = REAL_SHARPNESS.get(flow_rule(run), (names.SHARPNESS, names.THRESHOLD))
    if sharp in run.metrics and thresh in run.metrics and len(edge):
        ratio = (run.metric(sharp) / run.metric(thresh)).dropna()
        ratio = ratio[(ratio.index >= edge.index[0]) & (ratio.index <= edge.index[-1])]
        out["real_sharpness_ratio_mean"] = float(ratio.mean()) if len(ratio) else math.nan
        out["real_sharpness_ratio_std"] = float(ratio.std()) if len(ratio) > 1 else math.nan
    if "averaged_displacement_top" in edge and len(edge):
        ratio = edge["averaged_displacement_top"] / edge[names.FLOW_VARIANCE_TOP]
        (out["variance_ratio_q25"], out["variance_ratio_median"],
         out["variance_ratio_q75"]) = _quantiles(ratio[edge[names.FLOW_VARIANCE_TOP] > 0], 0.25, 0.5, 0.75)
        # bursts of oscillation (catapults) make the window average intermittent: the ratio of the
        # phase's means compares the total squared displacement with the total predicted
        out["variance_ratio_of_means"] = float(edge[names.FLOW_DISPLACEMENT_TOP].mean()
                                               / edge[names.FLOW_VARIANCE_TOP].mean())
    if flow_rule(run) == "vradam" and names.ETA in run.metrics:
        # the gate: the run's eta_t (step t's rate) against the flow's rate at time t
        eta = run.metric(names.ETA).reindex(table.index)
        rate_error = ((table[names.FLOW_RATE] - eta) / eta).abs()
        out["rate_error_median"], out["rate_error_max"] = _quantiles(rate_error, 0.5, 1.0)
        out["rate_min_run"], out["rate_min_flow"] = float(eta.min()), float(table[names.FLOW_RATE].min())
        out["rate_min_step_run"] = float(eta.idxmin())
        out["rate_min_step_flow"] = float(table[names.FLOW_RATE].idxmin())
    out["final_distance"] = float(table[names.FLOW_DISTANCE].iloc[-1])
    flow_s, replay_s = table[names.FLOW_SECONDS].mean(), table[names.FLOW_REPLAY_SECONDS].mean()
    out.update(flow_seconds_per_step=float(flow_s), replay_seconds_per_step=float(replay_s),
               cost_ratio=float(flow_s / replay_s) if replay_s > 0 else math.nan,
               matvecs_per_step=float(table[names.FLOW_MATVECS].mean()),
               third_derivatives_per_step=float(table[names.FLOW_THIRD_DERIVATIVES].mean()))
    return out


#: the columns of :func:`flow_agreement_table`, in order
AGREEMENT_COLUMNS = ("edge_onset", "edge_steps", "loss_error_median", "loss_error_p90", "loss_error_of_means",
                     "plain_loss_error_median", "flow_sharpness_ratio_mean", "real_sharpness_ratio_mean",
                     "real_sharpness_ratio_std", "variance_ratio_of_means", "variance_ratio_median",
                     "cost_ratio", "matvecs_per_step", "third_derivatives_per_step")


def flow_agreement_table(runs) -> pd.DataFrame:
    """One row of :func:`flow_agreement` per run that holds a flow (``label`` first)."""
    rows = []
    for run in runs:
        if has_flow(run):
            a = flow_agreement(run)
            rows.append({"label": run.label, "rule": flow_rule(run), **{c: a.get(c, math.nan) for c in AGREEMENT_COLUMNS}})
    return pd.DataFrame(rows)


def plot_flow(run: Run, axes=None, window: int = AVERAGE_WINDOW):
    """Three panels: the loss (real, its average, the flow's prediction and plain loss), the sharpness
    (real at tracking steps, the flow's, the threshold) and the oscillation (measured against predicted).

    ``axes``: three matplotlib axes (new ones when None); returns them.
    """
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    table = flow_table(run, window)
    ax_loss, ax_sharp, ax_var = axes
    steps = table.index
    ax_loss.plot(steps, table[names.TRAIN_LOSS], color="#999999", lw=0.7, label="train loss", gid="loss")
    ax_loss.plot(steps, table["averaged_loss"], color="#000000", lw=1.4, label=f"average ({window} steps)",
                 gid="averaged_loss")
    ax_loss.plot(steps, table[names.FLOW_PREDICTED_LOSS], color="#D55E00", lw=1.4,
                 label="flow: L + tr(H Sigma)/2", gid="flow_predicted_loss")
    ax_loss.plot(steps, table[names.FLOW_LOSS], color="#D55E00", lw=1.0, ls="--", label="flow: L(w)",
                 gid="flow_loss")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{run.label}: loss")
    ax_loss.legend(fontsize=8)
    sharp, thresh = REAL_SHARPNESS.get(flow_rule(run), (names.SHARPNESS, names.THRESHOLD))
    if sharp in run.metrics:
        real = run.metric(sharp).dropna()
        real = real[real.index <= steps[-1]]
        ax_sharp.plot(real.index, real, color="#0072B2", marker=".", ms=3, lw=0.8, label=f"run: {sharp}",
                      gid="sharpness")
    ax_sharp.plot(steps, table[names.FLOW_SHARPNESS], color="#D55E00", lw=1.4, label="flow", gid="flow_sharpness")
    ax_sharp.plot(steps, table[names.FLOW_THRESHOLD], color="#000000", ls="--", lw=1.0, label="threshold",
                  gid="threshold")
    ax_sharp.set(xlabel="step", ylabel="top eigenvalue", title="sharpness")
    ax_sharp.legend(fontsize=8)
    if names.FLOW_DISPLACEMENT_TOP in table:
        measured = table[names.FLOW_DISPLACEMENT_TOP]
        ax_var.plot(measured.index, measured, color="#999999", lw=0.6, label="measured (v1 . (w_real - w))^2",
                    gid="displacement")
        ax_var.plot(steps, table["averaged_displacement_top"], color="#000000", lw=1.4,
                    label=f"measured, average ({window} steps)", gid="averaged_displacement")
    predicted = table[names.FLOW_VARIANCE_TOP].where(table[names.FLOW_VARIANCE_TOP] > 0)
    ax_var.plot(steps, predicted, color="#D55E00", lw=1.4, label="predicted: top eigenvalue of Sigma",
                gid="flow_variance")
    ax_var.set_yscale("log")
    ax_var.set(xlabel="step", ylabel="squared displacement", title="oscillation")
    ax_var.legend(fontsize=8)
    return axes
