"""``eos compare``: the fair optimizer comparison, from tuning to a table with confidence intervals.

One spec (YAML or JSON; every key below) runs four phases into one
directory, each phase resuming whatever is already done. The directory's
``spec.json`` holds the spec as it ran (:meth:`CompareSpec.to_dict`: every
default filled in, ``--scale`` applied), which is all the report reads:

1. **Tune**: for each entry of ``optimizers``, ``trials`` configurations from
   its search space, trained with ``tune_seed`` and scored on validation by
   ``metric``. One Optuna study per (comparison, entry) in a database
   (``<dir>/studies.db``, SQLite, by default; any database URL Optuna accepts
   lets workers on other machines join with ``eos compare worker SPEC
   --storage URL``). Every entry gets the same number of trials and the same
   step budget by construction (refused otherwise, unless
   ``allow_unequal_budget``). The tuning runs do not evaluate the test split.
   Diverged trials are results, scored as the worst value; a trial whose
   process died is replaced (a heartbeat says which are dead).
2. **Select**: per entry, the trial with the best validation score. Nothing
   of the test split exists yet: it is asserted that no tuning record holds a
   test metric.
3. **Confirm**: each selected configuration re-run on ``seeds`` fresh seeds,
   evaluating the test split at the end.
4. **Report** (``eos compare report DIR`` rebuilds it from the records alone):
   per entry, the test metrics as mean +- 95% t-interval over seeds; the
   paired difference to the ``reference`` entry per seed with its interval
   and a paired t-test p-value; the budgets; the tuning curve (best
   validation value against trials spent) and the sensitivity curve
   (validation metric against lr); the edge-of-stability picture and
   VRAdam's damping for the confirmation runs; and conclusions written from
   those numbers, whichever way they come out.

Spec keys (from ``trials`` on, the values shown are the defaults, :data:`SPEC_DEFAULTS`)::

    name: cnn-fashion                 # default: the file's stem
    base: {task: ..., steps: ...}     # RunConfig keys shared by every run
    optimizers:                       # entries: a label -> its fixed keys and search space
      adamw:
        base: {optimizer: adamw}      # RunConfig keys of this entry (optimizer defaults to the label)
        space:                        # key: {log_uniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]}
          lr: {log_uniform: [1.0e-4, 1.0e-1]}  # | [v1, v2, ...] (categorical; the grid sampler's points)
      vradam:
        space: {lr: {log_uniform: [1.0e-4, 1.0e-1]}, beta3: {log_uniform: [0.01, 10]}, alpha1: [5, 10, 19]}
    trials: 8                         # per entry (an entry may say trials: N; then all must agree)
    sampler: sobol                    # grid | random | sobol | tpe
    metric: val_loss                  # val_loss (last) | min_val_loss | val_acc (last, maximised) |
                                      # steps_to_target | any other non-test metric (last value, minimised)
    target: null                      # steps_to_target: the value of target_metric to reach
    target_metric: val_loss
    tune_seed: 0
    seeds: [1, 2, 3, 4, 5]            # confirmation seeds
    reference: adamw                  # the entry differences are taken against (default: the first entry)
    # An entry with lr_from_eta: LABEL is not tuned: it runs at the time-averaged eta_t of LABEL's selected
    # trial (e.g. AdamW at VRAdam's mean effective rate: is the gate just a lower rate?).
    report_metrics: null              # default: the confirmation runs' test_* metrics (else metric's)
    allow_unequal_budget: false

Example (the protocol on two optimizers, tiny)::

    eos compare run my-spec.yaml --out runs/compare --workers 2
    eos compare report runs/compare/my-spec
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from analysis.compare import MARKER, SELECTION, SPEC_FILE, VAL_LOSS, metric_direction, tuning_score, tuning_trials
from eos_toolkit import metrics as names
from eos_toolkit.record import is_run_dir, read_events, read_metrics, run_status, write_json_atomic
from experiments.config import ConfigError, RunConfig, load_config_file
from experiments.resolve import resolve

SAMPLERS = ("grid", "random", "sobol", "tpe")
# The one home of the spec's defaults. The others follow from the spec itself: name (the file's stem), base ({}),
# reference (the first entry), and per entry base.optimizer (its label), space ({}) and trials (the spec's).
SPEC_DEFAULTS = {"trials": 8, "sampler": "sobol", "metric": VAL_LOSS, "target": None, "target_metric": VAL_LOSS,
                 "tune_seed": 0, "seeds": [1, 2, 3, 4, 5], "report_metrics": None, "allow_unequal_budget": False}
SPEC_KEYS = {"name", "base", "optimizers", "reference", *SPEC_DEFAULTS}
ENTRY_KEYS = {"base", "space", "trials", "lr_from_eta"}
HEARTBEAT_S, GRACE_S = 10, 40
PRESETS_DIR = Path(__file__).parent / "presets"


# ---------------------------------------------------------------- the spec

@dataclass
class Entry:
    label: str
    base: dict
    space: dict
    trials: int
    lr_from_eta: str | None = None  # untuned: lr = the time-averaged eta_t of this entry's selected trial


@dataclass
class CompareSpec:
    """A validated spec with every default filled in (:func:`parse_spec` makes it)."""

    name: str
    base: dict  # after --scale
    entries: list[Entry]
    trials: int
    sampler: str
    metric: str
    target: float | None
    target_metric: str
    tune_seed: int
    seeds: list[int]
    reference: str
    report_metrics: list[str] | None
    allow_unequal_budget: bool

    def entry(self, label: str) -> Entry:
        return next(e for e in self.entries if e.label == label)

    @property
    def direction(self) -> str:
        return metric_direction(self.metric)

    def to_dict(self) -> dict:
        """The spec as it runs, every key present: what ``spec.json`` holds and the report reads.

        A spec in its own right: :func:`parse_spec` gives this spec back from it
        (an untuned entry, ``lr_from_eta``, has ``trials: 0``). The file holds
        it with sorted keys, so there the entries are in alphabetical order.

        >>> spec = parse_spec({"optimizers": {"adamw": {}, "vradam": {}}}, name="tiny")
        >>> resolved = spec.to_dict()
        >>> resolved["optimizers"]["vradam"]
        {'base': {'optimizer': 'vradam'}, 'space': {}, 'trials': 8, 'lr_from_eta': None}
        >>> {k: resolved[k] for k in ("name", "sampler", "metric", "seeds", "reference")}
        {'name': 'tiny', 'sampler': 'sobol', 'metric': 'val_loss', 'seeds': [1, 2, 3, 4, 5], 'reference': 'adamw'}
        >>> parse_spec(resolved) == spec
        True
        """
        entries = {e.label: {"base": e.base, "space": e.space, "trials": e.trials, "lr_from_eta": e.lr_from_eta}
                   for e in self.entries}
        return {"name": self.name, "base": self.base, "optimizers": entries, "trials": self.trials,
                "sampler": self.sampler, "metric": self.metric, "target": self.target,
                "target_metric": self.target_metric, "tune_seed": self.tune_seed, "seeds": self.seeds,
                "reference": self.reference, "report_metrics": self.report_metrics,
                "allow_unequal_budget": self.allow_unequal_budget}


def _check_space(label: str, key: str, value) -> None:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"optimizers.{label}.space.{key} is an empty list")
        return
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("log_uniform", "uniform", "int")):
        raise ConfigError(f"optimizers.{label}.space.{key} must be {{log_uniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                          f"{{int: [lo, hi]}} or a list of values, got {value!r}")
    (kind, bounds), = value.items()
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
            and bounds[0] < bounds[1] and (kind != "log_uniform" or bounds[0] > 0)):
        raise ConfigError(f"optimizers.{label}.space.{key}: {kind} needs [lo, hi] with lo < hi"
                          f"{' and lo > 0' if kind == 'log_uniform' else ''}, got {bounds!r}")


def check_equal_budgets(budgets: dict, unit: str, allow: bool) -> None:
    """Refuse budgets that differ between optimizers (configurations, trials or steps) unless ``allow``.

    The one budget check of the toolkit: ``eos sweep`` and ``eos compare`` both call it.
    """
    if len(set(budgets.values())) > 1 and not allow:
        kind = "tuning" if unit in ("trials", "configurations") else "step"
        raise ConfigError(f"unequal {kind} budgets {budgets}: every optimizer must get the same number of {unit} "
                          "(or pass --allow-unequal-budget to say the comparison is not fair)")


def parse_spec(raw: dict, name: str = "compare", allow_unequal_budget: bool = False, scale: float = 1.0) -> CompareSpec:
    """Validate a spec dict (module docstring) into a :class:`CompareSpec`; ConfigError names what is wrong.

    Keys ``raw`` leaves out take :data:`SPEC_DEFAULTS`; ``name`` is the name
    when ``raw`` has none; ``scale`` multiplies base's steps and n_train.
    """
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown compare key(s) {unknown}; allowed: {sorted(SPEC_KEYS)}")
    given = {**SPEC_DEFAULTS, **raw}
    optimizers = given.get("optimizers")
    if not isinstance(optimizers, dict) or len(optimizers) < 2:
        raise ConfigError("a comparison needs 'optimizers': a mapping of at least two entries (label: {base, space})")
    base = dict(given.get("base", {}))
    if scale != 1.0:
        if not scale > 0:
            raise ConfigError(f"scale must be > 0, got {scale!r}")
        for key in ("steps", "n_train"):
            if key in base:
                base[key] = max(1, int(round(base[key] * scale)))
    entries = []
    for label, body in optimizers.items():
        body = body or {}
        if not isinstance(body, dict) or set(body) - ENTRY_KEYS:
            raise ConfigError(f"optimizers.{label} must be a mapping with keys {sorted(ENTRY_KEYS)}, got {body!r}")
        space = body.get("space", {})
        known = {f.name for f in dataclasses.fields(RunConfig)}
        for key, value in space.items():
            if key not in known:
                raise ConfigError(f"optimizers.{label}.space has unknown key {key!r}; it must be a RunConfig key")
            _check_space(label, key, value)
        entry_base = {"optimizer": label, **body.get("base", {})}
        trials = body.get("trials", given["trials"])
        least = 0 if body.get("lr_from_eta") else 1  # an untuned entry runs no trials (its resolved form says 0)
        if not (isinstance(trials, int) and not isinstance(trials, bool) and trials >= least):
            raise ConfigError(f"optimizers.{label}.trials must be an integer >= {least}, got {trials!r}")
        entries.append(Entry(label, entry_base, dict(space), 0 if body.get("lr_from_eta") else trials,
                             body.get("lr_from_eta")))
        # Every key and value checked now, at both ends of each range and at every listed value.
        corners = [{}] + [{k: (v[0] if isinstance(v, list) else next(iter(v.values()))[0])} for k, v in space.items()]
        corners += [{k: x} for k, v in space.items() if isinstance(v, list) for x in v[1:]]
        corners += [{k: next(iter(v.values()))[1]} for k, v in space.items() if isinstance(v, dict)]
        for corner in corners:
            try:
                resolve(RunConfig.from_dict({**base, **entry_base, **corner}))
            except ConfigError as exc:
                raise ConfigError(f"optimizers.{label}{' at ' + str(corner) if corner else ''}: {exc}") from None
    allow = bool(allow_unequal_budget or given["allow_unequal_budget"])
    for e in entries:
        source = e.lr_from_eta
        if source is not None:
            by_label = {x.label: x for x in entries}
            if source not in by_label or by_label[source].lr_from_eta or e.space:
                raise ConfigError(f"optimizers.{e.label}.lr_from_eta must name a tuned entry (and the entry has no "
                                  f"space of its own), got {source!r}")
    budgets = {e.label: e.trials for e in entries if e.lr_from_eta is None}
    check_equal_budgets(budgets, "trials", allow)
    check_equal_budgets({e.label: resolve(RunConfig.from_dict({**base, **e.base})).steps for e in entries},
                        "steps", allow)
    sampler = given["sampler"]
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if sampler == "grid":
        for e in entries:
            bad = [k for k, v in e.space.items() if not isinstance(v, list)]
            if bad:
                raise ConfigError(f"the grid sampler needs lists of values; optimizers.{e.label}.space has ranges {bad}")
            points = math.prod(len(v) for v in e.space.values()) if e.space else 1
            if points != e.trials:
                raise ConfigError(f"optimizers.{e.label}: the grid has {points} points but trials is {e.trials}")
    metric = given["metric"]
    for key in ("metric", "target_metric"):
        value = given[key]
        if not isinstance(value, str) or value.startswith("test_"):
            raise ConfigError(f"{key} {value!r} is not allowed: tuning is scored on validation, never on test_*")
    report = given["report_metrics"]
    if report is not None and not (isinstance(report, list) and all(isinstance(m, str) for m in report)):
        raise ConfigError(f"report_metrics must be a list of metric names, got {report!r}")
    if metric == "steps_to_target" and given["target"] is None:
        raise ConfigError("metric steps_to_target needs 'target'")
    seeds = given["seeds"]
    if not (isinstance(seeds, list) and len(seeds) >= 2 and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"seeds must be a list of at least two distinct seeds, got {seeds!r}")
    tune_seed = given["tune_seed"]
    if not (isinstance(tune_seed, int) and not isinstance(tune_seed, bool)) or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"tune_seed and seeds must be integers, got {tune_seed!r} and {seeds!r}")
    if tune_seed in seeds:
        raise ConfigError(f"tune_seed {tune_seed} is also a confirmation seed: confirmation needs fresh seeds")
    reference = given.get("reference", entries[0].label)
    if reference not in budgets:
        raise ConfigError(f"reference {reference!r} is not an entry; entries: {', '.join(budgets)}")
    tuned = [e for e in entries if e.lr_from_eta is None]
    return CompareSpec(name=given.get("name", name), base=base, entries=entries, trials=tuned[0].trials,
                       sampler=sampler, metric=metric, target=given["target"], target_metric=given["target_metric"],
                       tune_seed=tune_seed, seeds=list(seeds), reference=reference,
                       report_metrics=None if report is None else list(report), allow_unequal_budget=allow)


def load_spec(path_or_preset: str, allow_unequal_budget: bool = False, scale: float = 1.0) -> CompareSpec:
    """A spec from a file, or a shipped preset by name (``presets/<name>.yaml``)."""
    path = Path(path_or_preset)
    if not path.exists() and (PRESETS_DIR / f"{path_or_preset}.yaml").exists():
        path = PRESETS_DIR / f"{path_or_preset}.yaml"
    elif not path.exists():
        raise ConfigError(f"no spec file {path_or_preset!r} and no preset of that name; presets: "
                          f"{', '.join(preset_names())}")
    return parse_spec(load_config_file(path), name=path.stem, allow_unequal_budget=allow_unequal_budget, scale=scale)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


# ---------------------------------------------------------------- scores from records

def score_of(metrics, spec: CompareSpec, status: str) -> float:
    """The tuning score of one run's metrics table (worst for a diverged run); see analysis.compare."""
    return tuning_score(metrics, spec.metric, status, target=spec.target, target_metric=spec.target_metric)


def _refuse_test_metrics(run_dir: Path, names) -> None:
    """Selection must never see the test split: a tuning record holding test_* metrics is an error."""
    leaked = sorted(m for m in set(names) if m.startswith("test_"))
    if leaked:
        raise AssertionError(f"tuning run {run_dir} evaluated the test split ({leaked}); selection must not see it")


# ---------------------------------------------------------------- tuning (Optuna)

def _distributions(space: dict) -> dict:
    import optuna

    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = optuna.distributions.CategoricalDistribution(value)
        else:
            (kind, (lo, hi)), = value.items()
            out[key] = (optuna.distributions.IntDistribution(int(lo), int(hi)) if kind == "int" else
                        optuna.distributions.FloatDistribution(float(lo), float(hi), log=kind == "log_uniform"))
    return out


def _sampler(spec: CompareSpec, label: str):
    import warnings

    import optuna

    seed = spec.tune_seed * 7919 + sum(map(ord, label))
    if spec.sampler == "sobol":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, spec.trials // 3))
    return optuna.samplers.RandomSampler(seed=seed)  # grid: the points are enqueued; random for none


def spec_fingerprint(spec: CompareSpec) -> str:
    """What every worker of a study must agree on (the spec after scaling), as a short hash."""
    import hashlib

    text = json.dumps({"base": spec.base, "entries": [vars(e) for e in spec.entries], "metric": spec.metric,
                       "target": spec.target, "tune_seed": spec.tune_seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def storage_url(out_dir: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out_dir / 'studies.db').resolve()}"


def _study(spec: CompareSpec, entry: Entry, url: str):
    """The entry's study in the database at ``url`` (made by the first worker, joined by the others), and the
    storage, which keeps the heartbeats of its trials."""
    import itertools
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Argument ``heartbeat_interval`` is an experimental feature")
    warnings.filterwarnings("ignore", message="Argument ``grace_period`` is an experimental feature")
    for attempt in range(10):  # workers starting together race to create the schema and the study: retry
        try:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
            study = optuna.create_study(study_name=f"{spec.name}:{entry.label}", storage=storage,
                                        load_if_exists=True, direction=spec.direction,
                                        sampler=_sampler(spec, entry.label))
            break
        except Exception as exc:  # sqlalchemy IntegrityError / OperationalError from the race
            if attempt == 9 or "sqlalchemy" not in type(exc).__module__:
                raise
            time.sleep(0.5 + attempt)
    fingerprint = study.user_attrs.get("spec")
    if fingerprint is None:
        study.set_user_attr("spec", spec_fingerprint(spec))
    elif fingerprint != spec_fingerprint(spec):
        raise ConfigError(f"study {study.study_name} in {url} was made from another spec (or --scale); a worker "
                          "must use the same spec as the comparison it joins")
    if spec.sampler == "grid" and not study.get_trials(deepcopy=False) and study.user_attrs.get("grid") is None:
        study.set_user_attr("grid", True)
        keys = list(entry.space)
        for combo in itertools.product(*(entry.space[k] for k in keys)):
            study.enqueue_trial(dict(zip(keys, combo)))
    return study, storage


def _heartbeat(storage, study, trial) -> Callable[[], None]:
    """A function that records one heartbeat of ``trial``; a trial whose heartbeats stop for GRACE_S is stale
    (its worker died) and the next claim fails it."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               trial.number)
    return lambda: storage.record_heartbeat(trial_id)


def _claim_trial(study, storage, entry: Entry, distributions: dict):
    """A new trial if the budget has room, else None. Trial numbers come from the storage atomically:
    a trial with ``budget`` live or complete trials numbered before it is surplus and is failed at once."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        # Heartbeats are recorded by this module's own thread (ask/tell, not Study.optimize).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    counted = (TrialState.COMPLETE, TrialState.RUNNING)
    if len(study.get_trials(deepcopy=False, states=counted)) >= entry.trials:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask(distributions)
    _heartbeat(storage, study, trial)()  # from now on a dead worker's trial becomes stale
    ahead = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=counted))
    if ahead >= entry.trials:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def trial_config(spec: CompareSpec, entry: Entry, params: dict, seed: int, evaluate_test: bool) -> RunConfig:
    return resolve(RunConfig.from_dict({**spec.base, **entry.base, **params, "seed": seed,
                                        "evaluate_test": evaluate_test, "label": None}))


MAX_FAILURES = 3  # a configuration error fails every trial alike: stop after this many failures in a row


def _run_trial(study, storage, trial, spec: CompareSpec, entry: Entry, out_dir: Path) -> bool:
    """Train one trial and tell the storage its score; returns False when the run failed (not a result)."""
    from optuna.trial import TrialState

    from experiments.train import train

    run_dir = out_dir / "tune" / entry.label / f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    stop, record_heartbeat = threading.Event(), _heartbeat(storage, study, trial)

    def beat():
        while not stop.wait(HEARTBEAT_S / 2):
            try:
                record_heartbeat()
            except Exception:  # a busy database now and then; the next beat tries again
                continue

    threading.Thread(target=beat, daemon=True).start()
    try:
        cfg = trial_config(spec, entry, trial.params, spec.tune_seed, evaluate_test=False)
        result = train(cfg, run_dir)
        metrics = read_metrics(run_dir)
        _refuse_test_metrics(run_dir, metrics["metric"])
        value = score_of(metrics, spec, result.status)
    except AssertionError:
        stop.set()
        raise
    except Exception as exc:  # a failed run is not a result: the trial fails and another takes its place
        stop.set()
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        if spec.sampler == "grid":  # the grid point goes back in the queue
            study.enqueue_trial(trial.params)
        return False
    stop.set()
    if trial.number not in {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}:
        return True  # declared dead (stale) meanwhile: its replacement counts, this record does not
    trial.set_user_attr("status", result.status)
    study.tell(trial, value)
    write_json_atomic(run_dir / MARKER, {"trial": trial.number, "score": value, "status": result.status,
                                         "params": trial.params})
    return True


def tune_entry(spec: CompareSpec, entry: Entry, out_dir: Path, storage: str | None = None,
               echo: Callable[[str], object] = print) -> None:
    """Run trials of one entry until its budget is complete (safe to run in several processes at once)."""
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    study, database = _study(spec, entry, storage_url(out_dir, storage))
    distributions = _distributions(entry.space)
    failures = 0
    while True:
        trial = _claim_trial(study, database, entry, distributions)
        if trial is None:
            if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= entry.trials:
                return
            time.sleep(2)  # others are running the rest (or died: their heartbeat will expire)
            continue
        echo(f"tune {entry.label} trial {trial.number}: {trial.params}")
        if _run_trial(study, database, trial, spec, entry, out_dir):
            failures = 0
            continue
        failures += 1
        error = trial.user_attrs.get("error")
        echo(f"tune {entry.label} trial {trial.number} failed: {error}")
        if failures >= MAX_FAILURES:
            raise RuntimeError(f"{entry.label}: {failures} tuning trials failed in a row; the last: {error}")


def tune(spec: CompareSpec, out_dir: Path, storage: str | None = None,
         echo: Callable[[str], object] = print) -> None:
    """Tune every entry that is tuned until its budget is complete: one worker, of as many as run at once."""
    for entry in spec.entries:
        if entry.lr_from_eta is None:
            tune_entry(spec, entry, out_dir, storage, echo)


def _worker(spec_path: str, out_dir: str, storage: str | None, threads: int, allow_unequal_budget: bool,
            scale: float) -> None:
    import torch

    torch.set_num_threads(threads)
    tune(load_spec(spec_path, allow_unequal_budget, scale), Path(out_dir), storage, echo=lambda line: None)


# ---------------------------------------------------------------- selection and confirmation

def completed_trials(spec: CompareSpec, entry: Entry, out_dir: Path) -> list[dict]:
    """The entry's scored tuning trials in order (:func:`analysis.compare.tuning_trials`)."""
    return tuning_trials(out_dir, entry.label, entry.space, spec.metric, spec.target, spec.target_metric)


def select(spec: CompareSpec, out_dir: Path) -> dict[str, dict]:
    """The best validation trial per entry (its params), from tuning records that hold no test metric."""
    chosen = {}
    for entry in spec.entries:
        if entry.lr_from_eta is not None:
            continue
        trials = completed_trials(spec, entry, out_dir)
        if len(trials) < entry.trials:
            raise ValueError(f"{entry.label} has {len(trials)} of {entry.trials} tuning trials done; tune first")
        for t in trials:
            _refuse_test_metrics(t["run_dir"], t["test_metrics"])
        key = (lambda t: t["score"]) if spec.direction == "minimize" else (lambda t: -t["score"])
        chosen[entry.label] = min(trials, key=key)
    for entry in spec.entries:  # untuned entries at another entry's time-averaged effective rate
        if entry.lr_from_eta is not None:
            source = chosen[entry.lr_from_eta]
            metrics = read_metrics(source["run_dir"])
            eta = float(metrics[metrics.metric == names.ETA]["value"].mean())
            chosen[entry.label] = {"trial": None, "params": {"lr": eta}, "score": math.nan,
                                   "derived": f"lr = mean eta_t of {entry.lr_from_eta}'s trial {source['trial']}"}
    write_json_atomic(out_dir / SELECTION, {label: {k: t[k] for k in ("trial", "params", "score", "derived") if k in t}
                                            for label, t in chosen.items()})
    return chosen


def confirm_dir(out_dir: Path, label: str, seed: int) -> Path:
    return out_dir / "confirm" / label / f"seed-{seed}"


def _confirm_one(cfg_dict: dict, run_dir: str, threads: int) -> str:
    import torch

    from experiments.train import resume, train

    torch.set_num_threads(threads)
    path = Path(run_dir)
    if is_run_dir(path):
        status = run_status(read_events(path))
        if status in ("finished", "diverged"):
            return status
        return resume(path).status
    return train(RunConfig.from_dict(cfg_dict), path).status


def confirm(spec: CompareSpec, out_dir: Path, chosen: dict, workers: int = 1,
            echo: Callable[[str], object] = print) -> None:
    jobs = []
    for entry in spec.entries:
        for seed in spec.seeds:
            cfg = trial_config(spec, entry, chosen[entry.label]["params"], seed, evaluate_test=True)
            jobs.append((cfg.to_dict(), str(confirm_dir(out_dir, entry.label, seed))))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        for cfg, run_dir in jobs:
            echo(f"confirm {Path(run_dir).parent.name} {Path(run_dir).name}: {_confirm_one(cfg, run_dir, threads)}")
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for (cfg, run_dir), status in zip(jobs, pool.map(_confirm_one, *zip(*jobs), [threads] * len(jobs))):
            echo(f"confirm {Path(run_dir).parent.name} {Path(run_dir).name}: {status}")


def run_compare(spec_path: str, out: str | Path, *, workers: int = 1, storage: str | None = None,
                allow_unequal_budget: bool = False, scale: float = 1.0,
                echo: Callable[[str], object] = print) -> Path:
    """All four phases into ``out/<name>``; whatever is done already is kept."""
    spec = load_spec(spec_path, allow_unequal_budget, scale)
    out_dir = Path(out) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = spec.to_dict()
    spec_file = out_dir / SPEC_FILE
    if spec_file.exists() and json.loads(spec_file.read_text()) != json.loads(json.dumps(resolved)):
        raise ConfigError(f"{out_dir} holds a comparison with another spec ({spec_file}); use another --out")
    write_json_atomic(spec_file, resolved)
    echo(f"{spec.name}: {len(spec.entries)} optimizers x {spec.trials} trials x "
         f"{trial_config(spec, spec.entries[0], {}, 0, False).steps} steps; then {len(spec.seeds)} seeds each")
    if workers > 1:
        for entry in spec.entries:  # the studies (and the grid's queue) exist before any worker starts
            if entry.lr_from_eta is None:
                _study(spec, entry, storage_url(out_dir, storage))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            threads = max(1, (os.cpu_count() or 1) // workers)
            futures = [pool.submit(_worker, spec_path, str(out_dir), storage, threads, allow_unequal_budget, scale)
                       for _ in range(workers)]
            for f in futures:
                f.result()
    else:
        tune(spec, out_dir, storage, echo)
    chosen = select(spec, out_dir)
    for label, t in chosen.items():
        echo(f"selected {label}: {t.get('derived') or 'trial ' + str(t['trial'])} {t['params']} "
             f"({spec.metric} {t['score']:.4g})")
    confirm(spec, out_dir, chosen, workers, echo)
    from analysis.compare import write_compare_report

    return write_compare_report(out_dir)
