"""A comparison directory (``eos compare``) -> tables, paired statistics, figures and conclusions.

Reads only what the comparison wrote: ``spec.json``, the spec as it ran with
every key present (so no default of the spec is known here), and the run
records under ``tune/<entry>/trial-NNN`` and ``confirm/<entry>/seed-S``.
Nothing here imports torch or the experiments package, so a report rebuilds
on a laptop.

Statistics, per entry and report metric (the confirmation runs' final
values, one per seed):

- mean +- the half-width of the 95% Student-t interval, ``t_{0.975, n-1} s / sqrt(n)``;
- against the reference entry, per seed: the paired difference
  ``d_s = x_s - ref_s`` (the same seeds), its mean and t-interval, and the
  paired t-test's two-sided p-value (``scipy.stats.ttest_rel``).

A conclusion is a sentence computed from those numbers: "lower than ... by X
(95% CI [a, b])" when the interval excludes 0, "no difference at the 95%
level" when it does not. Whether lower is better follows the metric's name
(accuracy is maximised; losses, perplexities, distances and step counts are
minimised).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.derived import mean_ci
from eos_toolkit import metrics as names
from eos_toolkit.record import CONFIG_FILE, is_run_dir, read_events, read_metrics, run_status

VAL_LOSS, VAL_ACC = names.split_metric(names.VAL, "loss"), names.split_metric(names.VAL, "acc")
NAMED_METRICS = {  # tuning metric -> (recorded metric, reduction, direction)
    VAL_LOSS: (VAL_LOSS, "last", "minimize"),
    f"min_{VAL_LOSS}": (VAL_LOSS, "min", "minimize"),
    VAL_ACC: (VAL_ACC, "last", "maximize"),
}
CONFIDENCE = 0.95
MARKER = "trial.json"  # in a tuning trial's record once the study holds its result: only those count
SELECTION = "selection.json"  # the configuration selected per entry (written before confirmation)
SPEC_FILE = "spec.json"  # the comparison's spec, every key present (experiments.compare.CompareSpec.to_dict)


def metric_direction(metric: str) -> str:
    """``"maximize"`` for accuracies, ``"minimize"`` for everything else (losses, perplexities, distances, steps)."""
    if metric in NAMED_METRICS:
        return NAMED_METRICS[metric][2]
    return "maximize" if metric.endswith("_acc") or metric == "modes_found" else "minimize"


def tuning_score(metrics: pd.DataFrame, metric: str, status: str, *, target: float | None = None,
                 target_metric: str | None = None) -> float:
    """A run's tuning score: its ``metric`` (module docstring of experiments.compare); worst when it diverged.

    ``target`` and ``target_metric`` are read by ``steps_to_target`` only.
    """
    direction = metric_direction(metric)
    worst = math.inf if direction == "minimize" else -math.inf
    if status == "diverged":
        return worst
    if metric == "steps_to_target":  # the first step at which target_metric reached target, from its side
        if target is None or target_metric is None:
            raise ValueError("the tuning metric steps_to_target needs a target and a target_metric")
        series = metrics[metrics.metric == target_metric].set_index("step")["value"]
        reached = series[series >= target] if metric_direction(target_metric) == "maximize" else \
            series[series <= target]
        return float(reached.index[0]) if len(reached) else math.inf
    name, reduce, _ = NAMED_METRICS.get(metric, (metric, "last", direction))
    series = metrics[metrics.metric == name].sort_values("step")["value"]
    if not len(series):
        raise ValueError(f"the run logged no {name!r}, which the comparison's metric {metric!r} needs")
    value = float(series.min() if reduce == "min" else series.iloc[-1])
    return value if math.isfinite(value) else worst


def _status(run_dir: Path) -> str:
    return run_status(read_events(run_dir)) if is_run_dir(run_dir) else "empty"


def tuning_trials(out_dir: str | Path, entry: str, space, metric: str, target: float | None,
                  target_metric: str) -> list[dict]:
    """One entry's scored tuning trials, in trial order, read from their records (no database needed).

    Only records marked with :data:`MARKER` count (an abandoned trial was
    replaced). Each row: trial, run_dir, status, lr, params (dict over
    ``space``), score, and ``test_metrics``, the test_* metrics the record
    holds (selection refuses any).
    """
    rows = []
    for run_dir in sorted((Path(out_dir) / "tune" / entry).glob("trial-*")):
        if not (run_dir / MARKER).is_file():
            continue  # abandoned: its worker died or it was declared dead, and another trial replaced it
        status = _status(run_dir)
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        metrics = read_metrics(run_dir)
        rows.append({"trial": int(run_dir.name.split("-")[1]), "run_dir": run_dir, "status": status,
                     "lr": config.get("lr"), "params": {k: config.get(k) for k in space},
                     "score": tuning_score(metrics, metric, status, target=target, target_metric=target_metric),
                     "test_metrics": sorted(m for m in set(metrics["metric"]) if m.startswith("test_"))})
    return rows


def load_comparison(out_dir: str | Path) -> dict:
    """``{"spec", "tuning": DataFrame, "confirm": DataFrame, "selection"}`` read from a comparison directory.

    spec: :data:`SPEC_FILE`'s dict. tuning: entry, trial, status, lr, params
    (json), score. confirm: entry, seed, status, and the last value of every
    metric (wide). selection: :data:`SELECTION`'s dict ({} before selection).
    """
    out_dir = Path(out_dir)
    spec = json.loads((out_dir / SPEC_FILE).read_text())
    missing = sorted({"base", "metric", "optimizers", "reference", "report_metrics", "target", "target_metric"}
                     - set(spec))
    missing += sorted({f"optimizers.{entry}.{key}" for entry, body in spec.get("optimizers", {}).items()
                       for key in ("base", "lr_from_eta", "space", "trials") if key not in body})
    if missing:
        raise ValueError(f"{out_dir / SPEC_FILE} lacks {', '.join(missing)}: it holds a spec as given, not resolved "
                         "(an older eos compare wrote it); run 'eos compare run' with the same spec into a new "
                         "directory")
    tuning, confirm = [], []
    for entry, body in spec["optimizers"].items():
        for t in tuning_trials(out_dir, entry, body["space"], spec["metric"], spec["target"], spec["target_metric"]):
            tuning.append({"entry": entry, "trial": t["trial"], "status": t["status"], "lr": t["lr"],
                           "params": json.dumps(t["params"]), "score": t["score"]})
        for run_dir in sorted((out_dir / "confirm" / entry).glob("seed-*")):
            status = _status(run_dir)
            if status not in ("finished", "diverged"):
                continue
            m = read_metrics(run_dir).sort_values("step")
            row = {"entry": entry, "seed": int(run_dir.name.split("-")[1]), "status": status,
                   "steps": int(m["step"].max()) if len(m) else 0}
            row.update(m.groupby("metric")["value"].last().to_dict())
            row.pop(names.seconds(names.HESSIAN), None)
            confirm.append(row)
    selection = out_dir / SELECTION
    return {"spec": spec, "tuning": pd.DataFrame(tuning), "confirm": pd.DataFrame(confirm),
            "selection": json.loads(selection.read_text()) if selection.is_file() else {}}


def report_metrics(comparison: dict) -> list[str]:
    """The spec's report_metrics; unset, the confirmation runs' test_* metrics, else the one the tuning metric reads."""
    spec, confirm = comparison["spec"], comparison["confirm"]
    if spec["report_metrics"]:
        return list(spec["report_metrics"])
    tests = sorted(c for c in confirm.columns if str(c).startswith("test_"))
    if tests:
        return tests
    return [NAMED_METRICS.get(spec["metric"], (spec["metric"],))[0]]


def summary(comparison: dict) -> pd.DataFrame:
    """Per entry and metric: n, mean, 95% half-width; diverged confirmation runs counted, not averaged."""
    confirm, rows = comparison["confirm"], []
    for entry in comparison["spec"]["optimizers"]:
        runs = confirm[confirm.entry == entry] if len(confirm) else confirm
        ok = runs[runs.status == "finished"] if len(runs) else runs
        for metric in report_metrics(comparison):
            values = ok[metric].dropna().to_numpy(float) if metric in ok else np.array([])
            mean, half, n = mean_ci(values, CONFIDENCE)
            rows.append({"entry": entry, "metric": metric, "n": n, "mean": mean, "ci95": half,
                         "diverged": int((runs.status == "diverged").sum()) if len(runs) else 0})
    return pd.DataFrame(rows)


def paired_differences(comparison: dict) -> pd.DataFrame:
    """Per entry (reference aside) and metric: paired per-seed differences to the reference, CI and p-value."""
    from scipy import stats

    spec, confirm = comparison["spec"], comparison["confirm"]
    reference = spec["reference"]
    rows = []
    if not len(confirm):
        return pd.DataFrame(rows)
    ok = confirm[confirm.status == "finished"]
    for entry in spec["optimizers"]:
        if entry == reference:
            continue
        for metric in report_metrics(comparison):
            if metric not in ok:
                continue
            a = ok[ok.entry == entry].set_index("seed")[metric]
            b = ok[ok.entry == reference].set_index("seed")[metric]
            seeds = sorted(set(a.dropna().index) & set(b.dropna().index))
            d = (a.loc[seeds] - b.loc[seeds]).to_numpy(float)
            mean, half, _ = mean_ci(d, CONFIDENCE)
            p = float(stats.ttest_rel(a.loc[seeds], b.loc[seeds]).pvalue) if len(seeds) >= 2 else math.nan
            lost = {name: int((confirm.entry == name).sum()) - int((ok.entry == name).sum()) for name in (entry, reference)}
            rows.append({"entry": entry, "reference": reference, "metric": metric, "seeds": len(seeds),
                         "difference": mean, "ci_low": mean - half, "ci_high": mean + half, "p_value": p,
                         "diverged": lost[entry], "reference_diverged": lost[reference]})
    return pd.DataFrame(rows)


def conclusions(comparison: dict) -> list[str]:
    """Sentences from the paired differences; which way they go is read from the numbers."""
    sentences = []
    for row in paired_differences(comparison).itertuples():
        lost = ""
        if row.diverged or row.reference_diverged:
            lost = (f" Left out: {row.diverged} diverged seed(s) of {row.entry} and {row.reference_diverged} of "
                    f"{row.reference}; a divergence is a failure, not a number, so count it against the optimizer.")
        if row.seeds < 2 or not math.isfinite(row.ci_low):
            sentences.append(f"{row.entry} vs {row.reference} on {row.metric}: too few paired seeds ({row.seeds}) "
                             "for a conclusion.")
            continue
        where = f"(95% CI [{row.ci_low:.4g}, {row.ci_high:.4g}]) over {row.seeds} seeds (paired t-test p = " \
                f"{row.p_value:.3g})"
        if row.ci_low > 0 or row.ci_high < 0:
            word = "higher" if row.difference > 0 else "lower"
            better = (row.difference > 0) == (metric_direction(row.metric) == "maximize")
            verdict = "better" if better else "worse"
            if better and row.diverged > row.reference_diverged:
                verdict = "better on the seeds that did not diverge, but it diverged more often"
            sentences.append(f"{row.entry}'s {row.metric} is {word} than {row.reference}'s by "
                             f"{abs(row.difference):.4g} {where}: {row.entry} is {verdict} on this metric.{lost}")
        else:
            sentences.append(f"No difference at the 95% level between {row.entry} and {row.reference} on "
                             f"{row.metric}: the difference is {row.difference:.4g} {where}.{lost}")
    return sentences


def tuning_curves(comparison: dict, ax=None):
    """Best validation score against trials spent, one line per entry (the tuning budget's payoff)."""
    from analysis.plots import _finish, _new_axes

    tuning = comparison["tuning"]
    metric = comparison["spec"]["metric"]
    ax = ax if ax is not None else _new_axes()
    best = np.minimum.accumulate if metric_direction(metric) == "minimize" else np.maximum.accumulate
    from analysis.plots import OKABE_ITO

    for i, entry in enumerate(comparison["spec"]["optimizers"]):
        rows = tuning[tuning.entry == entry].sort_values("trial") if len(tuning) else tuning
        if len(rows):
            scores = rows["score"].to_numpy(float)
            ax.plot(np.arange(1, len(scores) + 1), best(scores), marker="o", label=entry, gid="tuning",
                    color=OKABE_ITO[i % len(OKABE_ITO)])
    _finish(ax, "trials spent", f"best {metric} so far", "Tuning curve")
    ax.legend()
    return ax


def sensitivity_curves(comparison: dict, ax=None):
    """Validation score against lr for every tuning trial, one colour per entry; diverged trials as x on the top."""
    from analysis.plots import OKABE_ITO, _finish, _new_axes

    tuning = comparison["tuning"]
    ax = ax if ax is not None else _new_axes()
    for i, entry in enumerate(comparison["spec"]["optimizers"]):
        rows = tuning[tuning.entry == entry] if len(tuning) else tuning
        finite = rows[np.isfinite(rows.score.astype(float))] if len(rows) else rows
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        if len(finite):
            ax.scatter(finite["lr"], finite["score"], label=entry, color=colour, gid="sensitivity")
        failed = rows[~np.isfinite(rows.score.astype(float))] if len(rows) else rows
        if len(failed):
            ax.scatter(failed["lr"], [0.97] * len(failed), marker="x", color=colour, clip_on=False,
                       transform=ax.get_xaxis_transform(), gid="diverged")
    ax.set_xscale("log")
    _finish(ax, "lr", comparison["spec"]["metric"], "Sensitivity to the learning rate")
    ax.legend()
    return ax


def _table(df: pd.DataFrame) -> str:
    from analysis.summary import markdown_table

    return markdown_table(df) if len(df) else "_nothing yet_"


def write_compare_report(out_dir: str | Path) -> Path:
    """``report.md`` with figures under ``figures/`` in the comparison directory; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.load import load_runs
    from analysis.report import save_figures

    out_dir = Path(out_dir)
    comparison = load_comparison(out_dir)
    spec, tuning = comparison["spec"], comparison["tuning"]
    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    written = []
    for name, draw in (("tuning_curve", tuning_curves), ("sensitivity", sensitivity_curves)):
        if len(tuning):
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            draw(comparison, ax=ax)
            fig.tight_layout()
            fig.savefig(figures / f"{name}.png", dpi=150)
            plt.close(fig)
            written.append(f"figures/{name}.png")
    confirm_dirs = sorted((out_dir / "confirm").glob("*/seed-*")) if (out_dir / "confirm").is_dir() else []
    if confirm_dirs:
        for path in save_figures(load_runs([str(p) for p in confirm_dirs]), figures, kinds=("sharpness", "damping"),
                                 formats=("png",), dpi=150):
            written.append(f"figures/{path.name}")
    budgets = []
    for entry, body in spec["optimizers"].items():
        n = int((tuning.entry == entry).sum()) if len(tuning) else 0
        steps = {**spec["base"], **body["base"]}.get("steps")  # a RunConfig key: absent means the task's default
        trials = f"none: lr = mean eta_t of {body['lr_from_eta']}" if body["lr_from_eta"] else body["trials"]
        budgets.append({"entry": entry, "trials": trials,
                        "trials done": n, "steps per run": steps if steps is not None else "task default",
                        "search space": json.dumps(body["space"])})
    chosen = [{"entry": entry, "trial": t["trial"] if t["trial"] is not None else t.get("derived"),
               "params": json.dumps(t["params"]), "score": t["score"]}
              for entry, t in comparison["selection"].items()]
    lines = [f"# Comparison: {spec['name']}", "",
             f"Tuning metric: `{spec['metric']}` on validation (the tuning runs never evaluated "
             f"the test split); sampler `{spec['sampler']}`; tune seed {spec['tune_seed']}; "
             f"confirmation seeds {spec['seeds']}; reference `{spec['reference']}`.", "",
             "## Budgets", "", _table(pd.DataFrame(budgets)), "",
             "## Selected configurations (best validation score)", "", _table(pd.DataFrame(chosen)), "",
             "## Test metrics over seeds (mean, 95% t-interval half-width)", "", _table(summary(comparison)), "",
             "## Paired differences to the reference (per seed)", "", _table(paired_differences(comparison)), "",
             "## Conclusions", ""]
    lines += [f"- {s}" for s in conclusions(comparison)] or ["- _no confirmation runs yet_"]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in written]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
