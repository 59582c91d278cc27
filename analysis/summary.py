"""Tables: per-run stability and outcome numbers, and the comparison across seeds.

:func:`stability_summary` answers "is this run at the edge, and does it oscillate";
:func:`run_summary` gives one row of outcomes per run; :func:`summary_table`
groups runs (by optimizer and lr by default) and reports mean +- 95% CI over
seeds; :func:`format_summary` and :func:`markdown_table` render them.

Which sharpness a run is judged by is read from its record, not from the
optimizer's name: a run that logged ``precond_sharpness`` and
``precond_threshold`` (an optimizer with a preconditioner P) by
lambda_max(P^-1 H) against that threshold, and VRAdam also against
``precond_threshold_eta`` (its effective rate eta_t); the others by
``sharpness`` against ``threshold``. The training loop wrote each threshold
from its optimizer's formula, whose one home is ``eos_toolkit/thresholds.py``
(the optimizer-to-formula table is ``eos_toolkit/adapters.py``). See
:func:`stability_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.derived import (
    clamp_fraction,
    damping_ratio,
    first_crossing_step,
    loss_rise_fraction,
    mean_ci,
    mean_update_cos,
    sharpness_ratio,
    sign_flip_rate,
    steps_above_threshold,
    steps_to_target,
)
from analysis.load import as_tidy, metric_series, run_label
from eos_toolkit import metrics as names


@dataclass(frozen=True)
class StabilityMetrics:
    """The metric names a run's stability picture uses (``threshold_eta`` only for VRAdam)."""

    sharpness: str
    threshold: str
    threshold_eta: str | None = None

    @property
    def preconditioned(self) -> bool:
        return self.sharpness.startswith("precond")


def run_ids(df: pd.DataFrame) -> list[str]:
    """The run ids in ``df``, in order of first appearance."""
    return list(dict.fromkeys(as_tidy(df)["run_id"]))


def split_runs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tidy table cut into one frame per run (in order of first appearance), in one pass."""
    df = as_tidy(df)
    return {rid: part for rid, part in df.groupby("run_id", sort=False)}


def run_info(df: pd.DataFrame, run_id: str) -> dict:
    """The per-run columns (status, config fields, label) of one run, as a dict."""
    df = as_tidy(df)
    rows = df[df["run_id"] == run_id]
    if not len(rows):
        raise ValueError(f"no run {run_id!r} in df; runs are {run_ids(df)}")
    info = rows.iloc[0].drop(["step", "metric", "value"], errors="ignore").to_dict()
    info.setdefault("label", run_label(info))
    return info


def stability_metrics(df: pd.DataFrame, run_id: str) -> StabilityMetrics | None:
    """Which sharpness/threshold pair judges this run; None when it logged no sharpness at all.

    A run with a preconditioner tracked without it falls back to its raw
    ``sharpness``; it has no ``threshold`` (2/lr does not apply to Adam), so no
    line is drawn for it and it never "crosses".
    """
    df = as_tidy(df)
    logged = set(df.loc[df["run_id"] == run_id, "metric"])
    if not logged:
        return None
    if {names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD} <= logged:
        eta = names.at_eta(names.PRECOND_THRESHOLD) if names.at_eta(names.PRECOND_THRESHOLD) in logged else None
        return StabilityMetrics(names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD, eta)
    if names.SHARPNESS in logged:
        return StabilityMetrics(names.SHARPNESS, names.THRESHOLD)
    return None


def _late_median(ratio: pd.Series, fraction: float = 0.5) -> float:
    # The median ratio over the last half of the measurements: where the run settled.
    r = ratio[np.isfinite(ratio.to_numpy())]
    if not len(r):
        return math.nan
    return float(r.iloc[int(len(r) * (1 - fraction)):].median())


STABILITY_COLUMNS = ("run_id", "label", "status", "sharpness", "first_crossing_step", "steps_above_threshold",
                     "late_ratio", "late_ratio_eta", "loss_rise_fraction", "sign_flip_rate", "mean_update_cos",
                     "mean_eta_over_lr", "clamp_fraction")


def stability_summary(df: pd.DataFrame, level: float = 1.0) -> pd.DataFrame:
    """One row per run: is it at the edge of stability, and does it oscillate?

    Columns: run_id, label, status, sharpness (the metric used), first_crossing_step
    (first measured step with sharpness >= level * threshold), steps_above_threshold,
    late_ratio (median sharpness/threshold over the last half of measurements;
    about 1 at the edge), late_ratio_eta (the same against 38/eta_t, VRAdam),
    loss_rise_fraction (train_loss), sign_flip_rate (update_proj_top),
    mean_update_cos, mean_eta_over_lr and clamp_fraction (VRAdam). Missing
    metrics give NaN (None for steps).
    """
    df = as_tidy(df)
    rows = []
    for rid, part in split_runs(df).items():
        info = run_info(part, rid)
        row = {"run_id": rid, "label": info["label"], "status": info.get("status")}
        pair = stability_metrics(part, rid)
        row["sharpness"] = pair.sharpness if pair else None
        row["first_crossing_step"] = None
        row["steps_above_threshold"] = None
        row["late_ratio"] = row["late_ratio_eta"] = math.nan
        if pair:
            sharp = metric_series(part, pair.sharpness)
            thr = metric_series(part, pair.threshold)
            row["first_crossing_step"] = first_crossing_step(sharp, thr, level)
            row["steps_above_threshold"] = steps_above_threshold(sharp, thr, level)
            row["late_ratio"] = _late_median(sharpness_ratio(sharp, thr))
            if pair.threshold_eta:
                row["late_ratio_eta"] = _late_median(sharpness_ratio(sharp, metric_series(part, pair.threshold_eta)))
        row["loss_rise_fraction"] = loss_rise_fraction(metric_series(part, names.TRAIN_LOSS))
        row["sign_flip_rate"] = sign_flip_rate(metric_series(part, names.UPDATE_PROJ_TOP))
        row["mean_update_cos"] = mean_update_cos(metric_series(part, names.UPDATE_COS))
        eta, lr = metric_series(part, names.ETA), metric_series(part, names.LR)
        ratio = damping_ratio(eta, lr) if len(lr) else pd.Series(dtype=float)
        row["mean_eta_over_lr"] = float(ratio.mean()) if len(ratio) else math.nan
        row["clamp_fraction"] = clamp_fraction(metric_series(part, names.VR_CLAMPED))
        rows.append(row)
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


def _accuracy_metric(df: pd.DataFrame) -> str | None:
    logged = set(df["metric"])
    candidates = (names.split_metric(split, "acc") for split in (names.VAL, names.TEST, names.TRACK))
    return next((m for m in candidates if m in logged), None)


def run_summary(df: pd.DataFrame, target_loss: float | None = None, loss: str = names.TRAIN_LOSS,
                acc: str | None = None) -> pd.DataFrame:
    """One row of outcomes per run.

    Columns: run_id, label, status, the config fields optimizer / lr / seed (when
    present), final_loss (last logged value of ``loss``; inf or NaN for a
    diverged run), best_loss (smallest finite value), final_acc / best_acc (of
    ``acc``: by default the first of val_acc, test_acc, track_acc that was
    logged), steps_to_target (first step with loss <= target_loss; None if never
    or no target given).
    """
    df = as_tidy(df)
    acc = acc or _accuracy_metric(df)
    rows = []
    for rid, part in split_runs(df).items():
        info = run_info(part, rid)
        row = {"run_id": rid, "label": info["label"], "status": info.get("status")}
        row.update({k: info[k] for k in ("optimizer", "lr", "seed") if k in info})
        values = metric_series(part, loss)
        finite = values[np.isfinite(values.to_numpy())]
        row["final_loss"] = float(values.iloc[-1]) if len(values) else math.nan
        row["best_loss"] = float(finite.min()) if len(finite) else math.nan
        accuracy = metric_series(part, acc) if acc else pd.Series(dtype=float)
        accuracy = accuracy[np.isfinite(accuracy.to_numpy())]
        row["final_acc"] = float(accuracy.iloc[-1]) if len(accuracy) else math.nan
        row["best_acc"] = float(accuracy.max()) if len(accuracy) else math.nan
        row["steps_to_target"] = steps_to_target(values, target_loss) if target_loss is not None else None
        rows.append(row)
    base = ["run_id", "label", "status", "final_loss", "best_loss", "final_acc", "best_acc", "steps_to_target"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*rows[0], *base]) if rows else base))


def completed(status: str) -> bool:
    """Whether a run with this status counts as a result: ``finished``, or ``empty`` (a record with no events)."""
    return status in ("finished", "empty")


SUMMARY_QUANTITIES = ("final_loss", "best_loss", "final_acc", "best_acc", "steps_to_target")


def summary_table(df: pd.DataFrame, group_by: Sequence[str] = ("optimizer", "lr"), target_loss: float | None = None,
                  loss: str = names.TRAIN_LOSS, acc: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Runs grouped (by optimizer and lr by default) with mean and CI half-width over seeds.

    Columns: the group keys, label, runs (how many), diverged (runs that diverged
    or ended with a non-finite loss), unfinished (runs still running, killed or
    failed), reached (runs that reached target_loss), then ``<q>_mean``,
    ``<q>_ci`` and ``<q>_n`` for q in final_loss, best_loss, final_acc,
    best_acc, steps_to_target. Only completed runs (see :func:`completed`) enter
    the statistics: a diverged run's loss is a failure, not a result, and an
    unfinished run's final loss is not final; the counts say how many were left
    out. steps_to_target averages over the runs that reached the target.
    ``<q>_ci`` is the half-width of the Student-t interval (see
    :func:`analysis.derived.mean_ci`), NaN with fewer than two runs.
    """
    per_run = run_summary(df, target_loss=target_loss, loss=loss, acc=acc)
    keys = [k for k in group_by if k in per_run.columns]
    if not keys:
        raise ValueError(f"none of the group_by columns {list(group_by)} is in the runs' config")
    diverged = (per_run["status"] == "diverged") | ~np.isfinite(per_run["final_loss"].astype(float))
    done = per_run["status"].map(completed) & ~diverged
    rows = []
    for key, group in per_run.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = group[done.loc[group.index]]
        labels = group["label"].unique()
        label = labels[0] if len(labels) == 1 else run_label(dict(zip(keys, key)))
        n_diverged = int(diverged.loc[group.index].sum())
        row = {**dict(zip(keys, key)), "label": label, "runs": len(group), "diverged": n_diverged,
               "unfinished": len(group) - len(ok) - n_diverged,
               "reached": int(ok["steps_to_target"].notna().sum()) if target_loss is not None else None}
        for q in SUMMARY_QUANTITIES:
            m, h, n = mean_ci(pd.to_numeric(ok[q], errors="coerce").to_numpy(dtype=float), confidence)
            row.update({f"{q}_mean": m, f"{q}_ci": h, f"{q}_n": n})
        rows.append(row)
    return pd.DataFrame(rows)


def _format_number(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def format_summary(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """:func:`summary_table` as text cells ``"mean ± ci"`` (``"-"`` for missing), quantities with no data dropped."""
    fixed = [c for c in table.columns if not any(c.startswith(q + "_") for q in SUMMARY_QUANTITIES)]
    out = table[fixed].copy()
    for q in SUMMARY_QUANTITIES:
        if f"{q}_mean" not in table or table[f"{q}_n"].sum() == 0:
            continue
        cells = []
        for m, h in zip(table[f"{q}_mean"], table[f"{q}_ci"]):
            cell = _format_number(m, digits)
            cells.append(cell if math.isnan(h) else f"{cell} ± {_format_number(h, 2)}")
        out[q] = cells
    if "reached" in out and out["reached"].isna().all():
        out = out.drop(columns="reached")
    return out


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a GitHub-flavoured markdown table (numbers to ``digits`` significant digits)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return _format_number(v, digits)
        if v is None:
            return "-"
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])
