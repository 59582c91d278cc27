"""The notebooks in analysis/notebooks, executed on the synthetic fixture runs, show those runs' numbers.

Each notebook runs once per module (nbclient) with EOS_RUNS_DIR pointing at the
fixture set; the tests then read the executed cells' outputs (tables as HTML,
printed text, figures as PNG) and compare them with answers computed here from
the run directories themselves (metrics.csv, events.jsonl, config.json read with
pandas and json, not through the analysis package).

The kernel is this interpreter (a kernelspec written into a temporary JUPYTER_PATH),
so the test works in any environment where the project and its test extras are
installed, whatever kernels Jupyter knows about.
"""

import ast
import base64
import io
import json
import math
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "analysis" / "notebooks").glob("*.ipynb"))
KERNEL = "eos-analysis-test"


def test_the_two_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"edge_of_stability_one_run.ipynb", "comparing_optimizers.ipynb"}


@pytest.fixture(scope="module")
def executed(tmp_path_factory, synthetic_runs):
    """``run(stem)``: the notebook executed on the synthetic runs (once per module), or its cell error."""
    home = tmp_path_factory.mktemp("notebooks")
    spec_dir = home / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "eos-toolkit test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(home / "jupyter"))
    mp.setenv("EOS_RUNS_DIR", str(synthetic_runs))
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cache = {}

    def run(stem):
        if stem not in cache:
            nb = nbformat.read(ROOT / "analysis" / "notebooks" / f"{stem}.ipynb", as_version=4)
            client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                             resources={"metadata": {"path": str(home)}})
            try:
                client.execute()
                cache[stem] = nb
            except nbclient.exceptions.CellExecutionError as err:
                cache[stem] = err
        if isinstance(cache[stem], Exception):
            raise cache[stem]
        return cache[stem]

    yield run
    mp.undo()


# ------------------------------------------------------- reading the outputs


def outputs_of(nb, snippet):
    """The outputs of the one code cell whose source contains ``snippet``."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    return cell.outputs


class _Table(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_rows(outputs):
    """The rows (lists of cell texts, header row first) of the DataFrame an output cell displayed."""
    (html,) = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    parser = _Table()
    parser.feed(html)
    return parser.rows


def html_records(outputs, key):
    """A displayed DataFrame as {row[key]: {column: text}}, the index column dropped."""
    header, *body = html_rows(outputs)
    records = [dict(zip(header[1:], row[1:])) for row in body]
    return {r[key]: r for r in records}


def number(text):
    return math.nan if text in ("NaN", "None", "-") else float(text)


# ------------------------------------------- the fixture runs, read directly


def complete_lines(path):
    """The lines of a record file that were written completely (a killed run leaves a partial last one)."""
    return path.read_text().split("\n")[:-1]


def read_fixture_runs(root):
    """{run_id: dict(config, status, diverged_step, metrics)} from the files of each run directory."""
    runs = {}
    for run_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        events = [json.loads(line) for line in complete_lines(run_dir / "events.jsonl")]
        last = events[-1]["event"]
        metrics = pd.read_csv(io.StringIO("\n".join(complete_lines(run_dir / "metrics.csv"))))
        config = json.loads((run_dir / "config.json").read_text())
        runs[run_dir.name] = {
            "config": config,
            "label": config.get("label") or f"{config['optimizer']} lr={config['lr']:g}",
            "status": last if last in ("finished", "diverged") else "incomplete",
            "diverged_step": events[-1]["step"] if last == "diverged" else math.nan,
            "metrics": metrics.pivot(index="step", columns="metric", values="value").sort_index(),
        }
    return runs


def crossing(m):
    """(first step with sharpness >= threshold, steps spent there) for a run's metrics table, or (nan, nan).

    The preconditioned pair for Adam-family runs that logged it; each measurement at or above the threshold
    counts the steps up to the next measurement."""
    pair = ("precond_sharpness", "precond_threshold") if "precond_sharpness" in m else ("sharpness", "threshold")
    if not set(pair) <= set(m.columns):
        return math.nan, math.nan
    both = m[list(pair)].dropna()
    above = both[pair[0]] >= both[pair[1]]
    if not above.any():
        return math.nan, 0
    gaps = pd.Series(both.index, index=both.index).diff().shift(-1).fillna(0)
    return above.idxmax(), gaps[above].sum()


def rise_fraction(m):
    diffs = np.diff(m["train_loss"].dropna().to_numpy())
    diffs = diffs[np.isfinite(diffs)]
    return float(np.mean(diffs > 0))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_figures_are_drawn(path, executed):
    """No cell error; at least three figures, each a PNG that decodes to a picture with coloured data."""
    nb = executed(path.stem)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3
    for png in pngs:
        img = np.round(matplotlib.image.imread(io.BytesIO(base64.b64decode(png)))[..., :3] * 255)
        assert min(img.shape[:2]) > 200
        assert ((img.max(axis=-1) - img.min(axis=-1)) > 60).sum() > 300  # coloured lines, not a blank frame


def test_one_run_notebook_picks_the_first_finished_run_at_the_edge_and_shows_its_numbers(executed, synthetic_runs):
    """The run shown is the first (by run_id) finished run whose plain sharpness reached its threshold; its
    config, and its crossing step, steps above, loss-rise and sign-flip rates, match the run's own files."""
    nb = executed("edge_of_stability_one_run")
    runs = read_fixture_runs(synthetic_runs)
    at_edge = [rid for rid, r in runs.items() if r["status"] == "finished" and "precond_sharpness" not in r["metrics"]
               and not math.isnan(crossing(r["metrics"])[0])]
    rid = at_edge[0]
    run = runs[rid]

    printed, config = outputs_of(nb, "print(run.label")
    assert printed["text"] == f"{run['label']} - finished\n"
    assert ast.literal_eval(config["data"]["text/plain"]) == run["config"]

    header, *body = html_rows(outputs_of(nb, "stability_summary(run.df)"))
    assert header == ["run_id", rid]
    shown = dict(body)
    m = run["metrics"]
    first, above = crossing(m)
    proj = m["update_proj_top"].dropna()
    proj = proj[(proj != 0) & np.isfinite(proj)].to_numpy()
    flips = float(np.mean(np.sign(proj[1:]) != np.sign(proj[:-1])))
    assert number(shown["first_crossing_step"]) == first
    assert number(shown["steps_above_threshold"]) == above
    assert number(shown["loss_rise_fraction"]) == pytest.approx(rise_fraction(m), abs=1e-6)
    assert number(shown["sign_flip_rate"]) == pytest.approx(flips, abs=1e-6)


def test_comparing_notebook_tables_match_the_fixture_runs(executed, synthetic_runs):
    """The overview, the per-group summary (counts; mean ± 95% t-interval of the final loss over finished
    seeds) and the stability table hold the values computed from the run directories."""
    nb = executed("comparing_optimizers")
    runs = read_fixture_runs(synthetic_runs)

    overview = html_records(outputs_of(nb, "runs.overview["), "run_id")
    assert sorted(overview) == sorted(runs)
    for rid, run in runs.items():
        row = overview[rid]
        assert (row["label"], row["status"]) == (run["label"], run["status"]), rid
        assert number(row["last_step"]) == run["metrics"].index.max(), rid
        assert number(row["diverged_step"]) == pytest.approx(run["diverged_step"], nan_ok=True), rid

    summary = html_records(outputs_of(nb, "format_summary("), "label")
    groups = {}
    for run in runs.values():
        groups.setdefault(run["label"], []).append(run)
    assert sorted(summary) == sorted(groups)
    for label, members in groups.items():
        row = summary[label]
        statuses = [r["status"] for r in members]
        assert number(row["runs"]) == len(members), label
        assert number(row["diverged"]) == statuses.count("diverged"), label
        assert number(row["unfinished"]) == statuses.count("incomplete"), label
        finals = [r["metrics"]["train_loss"].dropna().iloc[-1] for r in members if r["status"] == "finished"]
        if not finals:
            assert row["final_loss"] == "-", label
            continue
        mean, _, half = row["final_loss"].partition(" ± ")
        assert float(mean) == pytest.approx(np.mean(finals), rel=1e-3), label
        if len(finals) > 1:
            t = stats.t.ppf(0.975, len(finals) - 1)
            assert float(half) == pytest.approx(t * np.std(finals, ddof=1) / math.sqrt(len(finals)), rel=0.06), label
        else:
            assert half == "", label

    stability = html_records(outputs_of(nb, "analysis.stability_summary(runs.df)["), "run_id")
    assert sorted(stability) == sorted(runs)
    for rid, run in runs.items():
        row, m = stability[rid], run["metrics"]
        assert number(row["first_crossing_step"]) == pytest.approx(crossing(m)[0], nan_ok=True), rid
        assert number(row["loss_rise_fraction"]) == pytest.approx(rise_fraction(m), abs=1e-6), rid
        clamp = m["vr_clamped"].mean() if "vr_clamped" in m else math.nan
        assert number(row["clamp_fraction"]) == pytest.approx(clamp, abs=1e-6, nan_ok=True), rid
