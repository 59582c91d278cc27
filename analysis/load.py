"""Run records -> tidy pandas DataFrames.

The tidy table has one row per (run, step, metric)::

    run_id | status | <config fields, nested keys joined with "."> | label | step | metric | value

(``label`` is the config's label, or one made from optimizer and lr, see :func:`run_label`)

so that ``df.groupby(["optimizer", "lr"])`` and ``df.query("metric == 'sharpness'")``
work directly. :func:`wide` pivots it to one column per metric. Reading is done by
:mod:`eos_toolkit.record` (no torch); a half-written run, a diverged run and a
run still in progress all load, each with its ``status``.

Example:
    >>> import tempfile
    >>> from eos_toolkit.record import RunWriter
    >>> d = tempfile.mkdtemp()
    >>> w = RunWriter.create(f"{d}/gd", config={"task": "demo", "optimizer": "gd", "lr": 0.1, "seed": 0})
    >>> w.event("started", step=0)
    >>> w.log_metrics([(0, "train_loss", 1.0), (1, "train_loss", 0.5)])
    >>> run = load_run(f"{d}/gd")
    >>> run.status, run.label, run.df["value"].tolist()
    ('incomplete', 'gd lr=0.1', [1.0, 0.5])
"""

from __future__ import annotations

import glob as _glob
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from eos_toolkit.record import DamagedRecordError, find_runs, is_run_dir, read_run

TIDY_COLUMNS = ("run_id", "status", "step", "metric", "value")
log = logging.getLogger("analysis")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys; lists and other non-scalars become strings.

    >>> flatten_config({"lr": 0.1, "betas": [0.9, 0.99], "vr": {"beta3": 1.0}})
    {'lr': 0.1, 'betas': '[0.9, 0.99]', 'vr.beta3': 1.0}
    """
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (str, bool, int, float)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def run_label(config: dict) -> str:
    """The legend name of a run: ``config["label"]`` (a run writes its optimizer's display name there),
    else the optimizer and rate as the config has them.

    >>> run_label({"optimizer": "momentum", "lr": 0.05, "label": "Momentum lr=0.05"})
    'Momentum lr=0.05'
    >>> run_label({"optimizer": "momentum", "lr": 0.05})
    'momentum lr=0.05'
    """
    if config.get("label"):
        return str(config["label"])
    name = str(config.get("optimizer", "?"))
    lr = config.get("lr")
    return f"{name} lr={lr:g}" if isinstance(lr, (int, float)) else name


@dataclass
class Run:
    """One run record, read back.

    ``df`` is the tidy table (run_id, config fields, step, metric, value);
    ``density`` holds spectral-density curves (run_id, step, eigenvalue, density),
    empty when the run logged none; ``status`` is ``finished``, ``diverged``,
    ``failed``, ``incomplete`` or ``empty`` (see :func:`eos_toolkit.record.run_status`).
    """

    run_id: str
    run_dir: Path
    config: dict
    environment: dict
    events: list[dict]
    status: str
    df: pd.DataFrame
    density: pd.DataFrame

    @property
    def label(self) -> str:
        return run_label(self.config)

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optimizer", "")).lower()

    @property
    def diverged_step(self) -> int | None:
        """The step of the last ``diverged`` event, or None."""
        steps = [e.get("step") for e in self.events if e.get("event") == "diverged"]
        return int(steps[-1]) if steps else None

    def metric(self, name: str) -> pd.Series:
        """One metric as a Series indexed by step (empty when the run did not log it)."""
        return metric_series(self.df, name)

    @property
    def metrics(self) -> list[str]:
        return sorted(self.df["metric"].unique())


def _tidy(run_id: str, status: str, config: dict, metrics: pd.DataFrame) -> pd.DataFrame:
    flat = flatten_config(config)
    # A config key that collides with a tidy column keeps its value under "config.<key>".
    flat = {(f"config.{k}" if k in TIDY_COLUMNS else k): v for k, v in flat.items()}
    df = metrics.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)
    df.insert(0, "run_id", run_id)
    df.insert(1, "status", status)
    for i, (key, value) in enumerate(flat.items()):
        df.insert(2 + i, key, value)
    if "label" not in df.columns:
        df.insert(2 + len(flat), "label", run_label(config))
    return df


def load_run(run_dir: str | os.PathLike, run_id: str | None = None) -> Run:
    """Read one run record into a :class:`Run` (``run_id`` defaults to the directory name)."""
    rec = read_run(run_dir)
    run_id = run_id or rec.run_id
    density = rec.density.copy()
    density.insert(0, "run_id", run_id)
    return Run(
        run_id=run_id,
        run_dir=Path(run_dir),
        config=rec.config,
        environment=rec.environment,
        events=rec.events,
        status=rec.status,
        df=_tidy(run_id, rec.status, rec.config, rec.metrics),
        density=density,
    )


class Runs:
    """Several runs: ``df`` (all tidy tables, concatenated), ``density``, ``overview``.

    Iterating yields :class:`Run` objects; ``runs["run_id"]`` or ``runs[0]`` picks one.
    """

    def __init__(self, runs: Iterable[Run]):
        self.runs = list(runs)
        self.damaged: dict[str, str] = {}  # run directory -> why it could not be read (load_runs)
        ids = [r.run_id for r in self.runs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"run ids must be unique, got {ids}")

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __getitem__(self, key: int | str) -> Run:
        if isinstance(key, int):
            return self.runs[key]
        for run in self.runs:
            if run.run_id == key:
                return run
        raise KeyError(f"no run {key!r}; runs are {[r.run_id for r in self.runs]}")

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    @cached_property
    def df(self) -> pd.DataFrame:
        frames = [r.df for r in self.runs if len(r.df)]
        if not frames:
            return pd.DataFrame({c: [] for c in TIDY_COLUMNS})
        return pd.concat(frames, ignore_index=True, sort=False)

    @cached_property
    def density(self) -> pd.DataFrame:
        frames = [r.density for r in self.runs if len(r.density)]
        if not frames:
            return pd.DataFrame({c: [] for c in ("run_id", "step", "eigenvalue", "density")})
        return pd.concat(frames, ignore_index=True)

    @property
    def overview(self) -> pd.DataFrame:
        """One row per run: run_id, label, status, last step logged, diverged step, config fields."""
        rows = []
        for r in self.runs:
            last = int(r.df["step"].max()) if len(r.df) else None
            rows.append({"run_id": r.run_id, "label": r.label, "status": r.status, "last_step": last,
                         "diverged_step": r.diverged_step, **flatten_config(r.config)})
        return pd.DataFrame(rows)

    def select(self, **config_values) -> "Runs":
        """The runs whose config has these values, e.g. ``runs.select(optimizer="vradam")``."""
        return Runs(r for r in self.runs
                    if all(flatten_config(r.config).get(k) == v for k, v in config_values.items()))


def _expand(source: str | os.PathLike) -> list[Path]:
    path = Path(source)
    if path.exists():
        found = find_runs(path)
    else:
        matches = sorted(_glob.glob(str(source)))
        if not matches:
            raise FileNotFoundError(f"{source} is neither a run record, a directory of runs, nor a glob that matches")
        found = [p for m in matches for p in find_runs(m)]
    return found


def _unique_ids(dirs: list[Path]) -> list[str]:
    # The directory name, unless two runs share it (sweep/a/seed0, sweep/b/seed0):
    # then the path below the runs' common parent, with "/" separators.
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    return [d.resolve().relative_to(common).as_posix() if d.resolve() != common else d.name for d in dirs]


def load_runs(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> Runs:
    """Load run records from run directories, parent directories (searched recursively) or globs.

    Raises FileNotFoundError when a source matches nothing, and ValueError when no
    run record is found at all. A run whose files cannot be read (garbage in
    ``config.json``, a row of ``metrics.csv`` that is not a row) is skipped
    with one warning naming the file and line, and listed in ``Runs.damaged``;
    the others load. Nothing is ever modified.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    dirs: list[Path] = []
    for source in sources:
        for d in _expand(source):
            if is_run_dir(d) and d.resolve() not in {x.resolve() for x in dirs}:
                dirs.append(d)
    if not dirs:
        raise ValueError(f"no run records (directories with config.json) under {[str(s) for s in sources]}")
    loaded, damaged = [], {}
    for d, i in zip(dirs, _unique_ids(dirs)):
        try:
            loaded.append(load_run(d, run_id=i))
        except DamagedRecordError as exc:
            damaged[str(d)] = str(exc)
            log.warning("skipped a damaged run record: %s", exc)
    if not loaded:
        raise ValueError(f"every run record found is damaged: {damaged}")
    runs = Runs(loaded)
    runs.damaged = damaged
    return runs


def as_tidy(data) -> pd.DataFrame:
    """A tidy DataFrame from a DataFrame, a :class:`Run` or :class:`Runs` (plot functions accept all three)."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (Run, Runs)):
        return data.df
    raise TypeError(f"expected a tidy DataFrame, Run or Runs, got {type(data).__name__}")


def metric_series(df: pd.DataFrame, metric: str, run_id: str | None = None) -> pd.Series:
    """The values of ``metric`` as a float Series indexed by step, for one run.

    ``run_id`` may be omitted when ``df`` holds a single run.
    """
    df = as_tidy(df)
    if run_id is None:
        ids = df["run_id"].unique() if "run_id" in df.columns else []
        if len(ids) > 1:
            raise ValueError(f"df holds {len(ids)} runs; pass run_id, one of {list(ids)}")
        rows = df[df["metric"] == metric]
    else:
        rows = df[(df["run_id"] == run_id) & (df["metric"] == metric)]
    s = pd.Series(rows["value"].to_numpy(dtype=float), index=rows["step"].to_numpy(dtype="int64"), name=metric)
    s.index.name = "step"
    return s.sort_index()


def wide(df: pd.DataFrame, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Pivot a tidy table to one row per (run_id, step) and one column per metric.

    Metrics not logged at a step are NaN there (e.g. ``sharpness`` between
    tracking steps).

    >>> t = pd.DataFrame({"run_id": ["a"] * 3, "step": [0, 0, 1],
    ...                   "metric": ["loss", "sharpness", "loss"], "value": [1.0, 3.0, 0.5]})
    >>> wide(t).to_dict("list")
    {'run_id': ['a', 'a'], 'step': [0, 1], 'loss': [1.0, 0.5], 'sharpness': [3.0, nan]}
    """
    df = as_tidy(df)
    if metrics is not None:
        df = df[df["metric"].isin(list(metrics))]
    df = df.drop_duplicates(["run_id", "step", "metric"], keep="last")
    out = df.pivot(index=["run_id", "step"], columns="metric", values="value").reset_index()
    out.columns.name = None
    return out
