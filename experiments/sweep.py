"""Sweeps: a grid of runs over optimizers, rates and seeds, with equal tuning budgets by construction.

A sweep runs every point of a grid (the sharpness of GD against its rate, say);
it selects nothing. A tuned comparison (select on validation, confirm over
fresh seeds, confidence intervals) is ``eos compare``
(:mod:`experiments.compare`); both refuse unequal budgets with the same check.

A sweep file (JSON or YAML) holds a ``base`` config, a ``grid`` (a list of
entries; each maps keys to a value or a list of values, expanded as a
cartesian product) and ``seeds``::

    base: {task: eos-fullbatch, n_train: 1000, steps: 300}
    grid:
      - {optimizer: adam,   lr: [1.0e-3, 2.0e-3, 4.0e-3]}
      - {optimizer: vradam, lr: [1.0e-3, 2.0e-3, 4.0e-3]}
    seeds: [0, 1, 2]

Every optimizer must get the same number of configurations (its tuning
budget); a sweep that gives one optimizer more is refused unless
``allow_unequal_budget`` is set, because unequal budgets decide comparisons
(the published VRAdam protocol tuned it over 42 runs against 10-12 for each
baseline). Runs go to ``<out>/<name>``; they can run in parallel locally or be
emitted as one ``eos run`` command per line for any cluster scheduler.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from eos_toolkit.record import CONFIG_FILE, RunLockedError, is_run_dir, read_events, run_status, write_json_atomic
from experiments.compare import check_equal_budgets
from experiments.config import ConfigError, RunConfig, load_config_file
from experiments.resolve import resolve


@dataclass(frozen=True)
class SweepRun:
    name: str
    config: RunConfig


def _expand(entry: dict) -> list[dict]:
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _run_name(values: dict, seed: int) -> str:
    parts = [str(values.get("optimizer", "gd"))]
    parts += [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(values.items())
              if k not in ("optimizer", "seed") and not isinstance(v, (dict, list))]
    return "-".join(parts + [f"s{seed}"]).replace("/", "_")


def expand_sweep(spec: dict, allow_unequal_budget: bool = False) -> list[SweepRun]:
    """The runs of a sweep spec (see the module docstring), validated."""
    unknown = sorted(set(spec) - {"base", "grid", "seeds"})
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; allowed: base, grid, seeds")
    base, grid, seeds = spec.get("base", {}), spec.get("grid", [{}]), spec.get("seeds", [0])
    if not isinstance(grid, list) or not all(isinstance(e, dict) for e in grid):
        raise ConfigError("sweep 'grid' must be a list of mappings (key: value or list of values)")
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"sweep 'seeds' must be a non-empty list, got {seeds!r}")
    points = [values for entry in grid for values in _expand(entry)]
    budget = Counter(values.get("optimizer", base.get("optimizer", "gd")) for values in points)
    check_equal_budgets(dict(budget), "configurations", allow_unequal_budget)
    runs, names = [], set()
    for values in points:
        for seed in seeds:
            cfg = resolve(RunConfig.from_dict({**base, **values, "seed": seed}))
            name = _run_name({**values, "optimizer": cfg.optimizer}, seed)
            if name in names:
                raise ConfigError(f"the sweep lists run {name!r} twice")
            names.add(name)
            runs.append(SweepRun(name, cfg))
    return runs


def load_sweep(path: str | Path, allow_unequal_budget: bool = False) -> list[SweepRun]:
    return expand_sweep(load_config_file(path), allow_unequal_budget)


def write_configs(runs: list[SweepRun], out: str | Path) -> list[Path]:
    """One resolved config file per run under ``<out>/configs/`` (what emitted commands point at)."""
    paths = []
    for run in runs:
        path = Path(out) / "configs" / f"{run.name}.json"
        write_json_atomic(path, run.config.to_dict())
        paths.append(path)
    return paths


def commands(runs: list[SweepRun], out: str | Path) -> list[str]:
    """One ``eos run`` command per run, for any scheduler (configs must be written first)."""
    out = Path(out)
    return [f"eos run {r.config.task} --config {out / 'configs' / (r.name + '.json')} --out {out} --name {r.name}"
            for r in runs]


def config_differences(stored: dict, expected: RunConfig) -> list[str]:
    """Keys whose value in a run's stored config.json differs from the sweep's config for that run.

    The stored config is validated first, so a key added to RunConfig after
    the record was written counts as its default. A requested
    ``dataset: auto`` must match the data set ``auto`` resolves to here now.
    """
    try:
        stored = resolve(RunConfig.from_dict(dict(stored))).to_dict()
    except ConfigError:
        pass  # compared as written; the differences name what no longer validates
    wanted = json.loads(json.dumps(expected.to_dict()))  # as it would read back from config.json
    if wanted.get("dataset") == "auto":
        from experiments.tasks import task_class

        try:
            wanted["dataset"] = task_class(expected.task).resolve_data(expected)
        except ValueError as exc:
            wanted["dataset"] = f"auto (resolves to nothing here: {exc})"
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key, "<missing>") != wanted.get(key, "<missing>"):
            diffs.append(f"{key}: recorded {stored.get(key, '<missing>')!r}, sweep {wanted.get(key, '<missing>')!r}")
    return diffs


def check_existing_records(runs: list[SweepRun], out: str | Path) -> None:
    """Refuse to reuse a record whose config is not the one the sweep would run under that name.

    Records are found by run name; after an edit of the spec an old record
    with the same name would otherwise count as done (or be resumed).
    """
    stale = []
    for run in runs:
        path = Path(out) / run.name
        if is_run_dir(path):
            try:
                stored = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                stale.append(f"{path}: unreadable {CONFIG_FILE} ({exc})")
                continue
            diffs = config_differences(stored, run.config)
            if diffs:
                stale.append(f"{path}: " + "; ".join(diffs))
    if stale:
        raise ConfigError("existing run records were made with a different config than this sweep gives them "
                          "(move them away or use another output directory):\n  " + "\n  ".join(stale))


def _run_one(run: SweepRun, out: str, threads: int) -> tuple[str, str]:
    """Train one run, resume it if a record was left incomplete, or skip it if it has ended."""
    import torch

    from experiments.train import resume, train

    torch.set_num_threads(threads)
    path = Path(out) / run.name
    try:
        for _ in range(2):  # a second look when another sweep created the record meanwhile
            if is_run_dir(path):
                status = run_status(read_events(path))
                if status in ("finished", "diverged"):
                    return run.name, f"{status} (already recorded)"
                try:
                    return run.name, resume(path).status + " (resumed)"
                except ValueError as exc:  # it ended between our look and our lock
                    if "nothing to resume" not in str(exc):
                        raise
                    continue
            try:
                return run.name, train(run.config, path).status
            except FileExistsError as exc:
                if isinstance(exc, RunLockedError):
                    raise
                continue
        return run.name, f"{run_status(read_events(path))} (already recorded)"
    except RunLockedError as exc:  # another process (a second sweep) is training it: not ours to touch
        return run.name, f"skipped: {exc}"
    except Exception as exc:  # the run's record holds a 'failed' event; the sweep goes on
        return run.name, f"failed: {type(exc).__name__}: {exc}"


def run_sweep(runs: list[SweepRun], out: str | Path, jobs: int = 1, on_done=None) -> dict[str, str]:
    """Run a sweep into ``out`` with ``jobs`` processes; finished runs are kept, incomplete ones resumed.

    An existing record whose config differs from the sweep's is refused
    (:func:`check_existing_records`) before anything runs. Each process gets ``cpu_count // jobs`` torch threads. Returns name -> status.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    check_existing_records(runs, out)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    statuses = {}

    def done(name: str, status: str) -> None:
        statuses[name] = status
        if on_done:
            on_done(name, status)

    if jobs == 1:
        for run in runs:
            done(*_run_one(run, str(out), threads))
        return statuses
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(_run_one, run, str(out), threads) for run in runs]):
            done(*future.result())
    return statuses
