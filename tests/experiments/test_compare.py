"""eos compare: equal budgets, selection blind to test, resume, parallel workers, statistics recomputed here."""

import json
import math
import multiprocessing
import subprocess
import sys

import pytest
from scipy import stats

from analysis.compare import load_comparison, paired_differences, summary
from eos_toolkit.record import read_metrics
from experiments.compare import ENTRY_KEYS, SPEC_KEYS, load_spec, parse_spec, run_compare, select, tune_entry
from experiments.config import ConfigError

BASE = {"task": "image-classification", "dataset": "fashion-mnist", "n_train": 100, "steps": 6, "batch_size": 20,
        "model": "mlp-tanh", "model_options": {"hidden": [8]}, "track_every": 3, "track_n": 20, "val_fraction": 0.2,
        "device": "cpu", "augment": False}


def spec_dict(data_dir, **overrides):
    return {"name": "tiny", "base": {**BASE, "data_dir": str(data_dir)},
            "optimizers": {"adamw": {"space": {"lr": {"log_uniform": [1e-3, 1e-1]}}},
                           "vradam": {"space": {"lr": {"log_uniform": [1e-3, 1e-1]}, "beta3": [0.1, 1.0]}}},
            "trials": 3, "sampler": "random", "seeds": [1, 2], "reference": "adamw", **overrides}


def write_spec(tmp_path, data_dir, **overrides):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec_dict(data_dir, **overrides)))
    return path


def test_equal_budgets_by_construction():
    raw = spec_dict("/tmp")
    raw["optimizers"]["vradam"]["trials"] = 5
    with pytest.raises(ConfigError, match=r"unequal tuning budgets \{'adamw': 3, 'vradam': 5\}"):
        parse_spec(raw)
    assert parse_spec(raw, allow_unequal_budget=True).entry("vradam").trials == 5
    raw = spec_dict("/tmp")
    raw["optimizers"]["vradam"]["base"] = {"steps": 12}
    with pytest.raises(ConfigError, match=r"unequal step budgets \{'adamw': 6, 'vradam': 12\}"):
        parse_spec(raw)
    for bad, message in ((dict(metric="test_loss"), "tuning is scored on validation"),
                         (dict(tune_seed=1), "tune_seed 1 is also a confirmation seed"),
                         (dict(sampler="cmaes"), "unknown sampler 'cmaes'"),
                         (dict(reference="sgd"), "reference 'sgd' is not an entry"),
                         (dict(report_metrics="test_loss"), "report_metrics must be a list"),
                         (dict(target_metric="test_acc"), "target_metric 'test_acc' is not allowed"),
                         (dict(tune_seed="x"), "tune_seed and seeds must be integers")):
        with pytest.raises(ConfigError, match=message):
            parse_spec(spec_dict("/tmp", **bad))
    typo = spec_dict("/tmp")
    typo["optimizers"]["adamw"]["space"] = {"lrr": {"log_uniform": [1e-3, 1e-1]}}
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        parse_spec(typo)
    negative = spec_dict("/tmp")
    negative["optimizers"]["vradam"]["space"]["beta3"] = {"uniform": [-5, 1]}
    with pytest.raises(ConfigError, match=r"optimizers.vradam at \{'beta3': -5\}: beta3 must be a finite number >= 0"):
        parse_spec(negative)
    grid = spec_dict("/tmp", sampler="grid")
    with pytest.raises(ConfigError, match="the grid sampler needs lists"):
        parse_spec(grid)


def test_presets_parse():
    for name in ("cnn-fashion", "lm-brown", "gfn-hypergrid", "vradam-vs-clip", "vradam-vs-eta-avg"):
        spec = load_spec(name)
        assert len({e.trials for e in spec.entries if e.lr_from_eta is None}) == 1 and len(spec.seeds) == 5


def test_the_resolved_spec_has_every_key_and_parses_back_to_the_same_spec():
    """spec.json's form (what analysis reads, knowing no default): every key present, a spec in its own right."""
    for name in ("cnn-fashion", "vradam-vs-eta-avg"):
        for scale in (1.0, 0.5):
            spec = load_spec(name, scale=scale)
            resolved = json.loads(json.dumps(spec.to_dict()))  # as the file holds it
            assert set(resolved) == SPEC_KEYS
            assert all(set(body) == ENTRY_KEYS for body in resolved["optimizers"].values())
            assert parse_spec(resolved) == spec
    halved = load_spec("cnn-fashion", scale=0.5).to_dict()["base"]
    assert (halved["steps"], halved["n_train"]) == (200, 2500)  # the preset's 400 and 5000, scaled


def test_an_untuned_entry_runs_at_the_mean_effective_rate_of_another(tiny_data_dir, tmp_path):
    import pandas as pd

    raw = spec_dict(tiny_data_dir, trials=2)
    raw["optimizers"]["adamw-at-eta"] = {"base": {"optimizer": "adamw"}, "lr_from_eta": "vradam"}
    spec = parse_spec(raw)
    out_dir = tmp_path / "tiny"
    for entry in spec.entries:
        if entry.lr_from_eta is None:
            tune_entry(spec, entry, out_dir, echo=lambda s: None)
    chosen = select(spec, out_dir)
    source = out_dir / "tune" / "vradam" / f"trial-{chosen['vradam']['trial']:03d}" / "metrics.csv"
    table = pd.read_csv(source)
    assert chosen["adamw-at-eta"]["params"]["lr"] == pytest.approx(table[table.metric == "eta"]["value"].mean())
    with pytest.raises(ConfigError, match="lr_from_eta must name a tuned entry"):
        parse_spec({**raw, "optimizers": {**raw["optimizers"], "x": {"base": {"optimizer": "adamw"}, "lr_from_eta": "nope"}}})


def test_a_tiny_comparison_end_to_end_killed_and_resumed(tiny_data_dir, tmp_path, monkeypatch):
    """Kill the tuning after two trials, resume without re-running them, then check the report's numbers."""
    import experiments.compare as cmp

    spec_path = write_spec(tmp_path, tiny_data_dir)
    real_run_trial, calls = cmp._run_trial, []

    def run_trial_then_maybe_die(study, storage, trial, spec, entry, out_dir):
        ok = real_run_trial(study, storage, trial, spec, entry, out_dir)
        calls.append((entry.label, trial.number))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between trials
        return ok

    monkeypatch.setattr(cmp, "_run_trial", run_trial_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        run_compare(str(spec_path), tmp_path / "out", echo=lambda s: None)
    first = list(calls)
    report = run_compare(str(spec_path), tmp_path / "out", echo=lambda s: None)
    assert calls[:2] == first and len(calls) == 6  # the two finished trials were not run again
    out_dir = tmp_path / "out" / "tiny"
    stored = json.loads((out_dir / "spec.json").read_text())  # what tiny.json leaves out, at its documented default
    assert {k: stored[k] for k in ("tune_seed", "target", "target_metric", "report_metrics")} == \
        {"tune_seed": 0, "target": None, "target_metric": "val_loss", "report_metrics": None}
    vradam = stored["optimizers"]["vradam"]
    assert (vradam["base"], vradam["trials"], vradam["lr_from_eta"]) == ({"optimizer": "vradam"}, 3, None)
    comparison = load_comparison(out_dir)
    assert comparison["tuning"].groupby("entry").size().to_dict() == {"adamw": 3, "vradam": 3}
    confirm = comparison["confirm"]
    assert sorted(zip(confirm.entry, confirm.seed)) == [("adamw", 1), ("adamw", 2), ("vradam", 1), ("vradam", 2)]
    # Independent statistics: scipy's t-interval and paired t-test on the records' final test losses.
    finals = {}
    for entry in ("adamw", "vradam"):
        for seed in (1, 2):
            m = read_metrics(out_dir / "confirm" / entry / f"seed-{seed}")
            finals[(entry, seed)] = m[m.metric == "test_loss"].sort_values("step")["value"].iloc[-1]
    table = summary(comparison).set_index(["entry", "metric"])
    for entry in ("adamw", "vradam"):
        x = [finals[(entry, 1)], finals[(entry, 2)]]
        low, high = stats.t.interval(0.95, 1, loc=sum(x) / 2, scale=stats.sem(x))
        assert table.loc[(entry, "test_loss"), "mean"] == pytest.approx(sum(x) / 2, rel=1e-12)
        assert table.loc[(entry, "test_loss"), "ci95"] == pytest.approx((high - low) / 2, rel=1e-9)
    diff = paired_differences(comparison).set_index("metric").loc["test_loss"]
    d = [finals[("vradam", s)] - finals[("adamw", s)] for s in (1, 2)]
    assert diff["difference"] == pytest.approx(sum(d) / 2, rel=1e-9)
    assert diff["p_value"] == pytest.approx(stats.ttest_rel([finals[("vradam", s)] for s in (1, 2)],
                                                            [finals[("adamw", s)] for s in (1, 2)]).pvalue, rel=1e-9)
    text = report.read_text()
    from analysis.compare import write_compare_report

    report.unlink()
    (out_dir / "studies.db").unlink()  # the report is rebuilt from the records alone
    assert write_compare_report(out_dir).read_text() == text
    assert "## Conclusions" in text and ("No difference at the 95% level" in text or "is lower than" in text
                                         or "is higher than" in text)
    assert f"{diff['difference']:.4g}" in text


def test_selection_never_reads_the_test_split(tiny_data_dir, tmp_path):
    """A trap in the test metric of every tuning record changes nothing; a test metric there is refused."""
    spec = parse_spec(spec_dict(tiny_data_dir))
    out_dir = tmp_path / "tiny"
    for entry in spec.entries:
        tune_entry(spec, entry, out_dir, echo=lambda s: None)
    chosen = {k: v["trial"] for k, v in select(spec, out_dir).items()}
    for run_dir in (out_dir / "tune").glob("*/trial-*"):
        assert not any(m.startswith("test_") for m in set(read_metrics(run_dir).metric))  # never evaluated
    victim = next((out_dir / "tune" / "adamw").glob("trial-*"))
    with open(victim / "metrics.csv", "a") as f:  # a trap: a test metric where selection must not look
        f.write("6,test_loss,-1000\n")
    with pytest.raises(AssertionError, match="evaluated the test split"):
        select(spec, out_dir)
    lines = (victim / "metrics.csv").read_text().splitlines()[:-1]
    (victim / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert {k: v["trial"] for k, v in select(spec, out_dir).items()} == chosen


def test_a_diverged_trial_counts_and_scores_worst(tiny_data_dir, tmp_path):
    raw = spec_dict(tiny_data_dir)
    raw["optimizers"]["adamw"]["space"] = {"lr": [1e-3, 1e6]}
    raw["optimizers"]["vradam"]["space"] = {"lr": [1e-3, 2e-3]}
    raw.update(trials=2, sampler="grid")
    spec = parse_spec(raw)
    out_dir = tmp_path / "tiny"
    for entry in spec.entries:
        tune_entry(spec, entry, out_dir, echo=lambda s: None)
    tuning = load_comparison_like(spec, out_dir)
    adamw = tuning[tuning.entry == "adamw"].set_index("lr")
    assert adamw.loc[1e6, "status"] == "diverged" and adamw.loc[1e6, "score"] == math.inf
    assert len(adamw) == 2 and select(spec, out_dir)["adamw"]["lr"] == 1e-3


def load_comparison_like(spec, out_dir):
    import pandas as pd

    from experiments.compare import completed_trials

    return pd.DataFrame([{**t, "entry": e.label} for e in spec.entries for t in completed_trials(spec, e, out_dir)])


def _tune_in_process(spec_path, out_dir):
    import torch

    from experiments.compare import load_spec, tune_entry

    torch.set_num_threads(1)  # two workers on two cores
    spec = load_spec(spec_path)
    for entry in spec.entries:
        tune_entry(spec, entry, __import__("pathlib").Path(out_dir), echo=lambda s: None)


def test_two_workers_on_one_store_run_each_trial_once(tiny_data_dir, tmp_path):
    import optuna

    spec_path = write_spec(tmp_path, tiny_data_dir, trials=2)
    out_dir = tmp_path / "tiny"
    out_dir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_tune_in_process, args=(str(spec_path), str(out_dir))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240)
        assert w.exitcode == 0
    storage = f"sqlite:///{out_dir / 'studies.db'}"
    for entry in ("adamw", "vradam"):
        trials = optuna.load_study(study_name=f"tiny:{entry}", storage=storage).get_trials()
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == 2  # exactly the budget
        dirs = sorted((out_dir / "tune" / entry).glob("trial-*"))
        assert len(dirs) == len({t.user_attrs["run_dir"] for t in complete}) == 2  # one record per trial
        for d in dirs:
            events = [json.loads(line)["event"] for line in (d / "events.jsonl").read_text().splitlines()]
            assert events == ["started", "hvp_method", "finished"]  # not run twice, not interleaved


@pytest.mark.slow
def test_cli_compare_report_rebuilds_from_records(tiny_data_dir, tmp_path):
    spec_path = write_spec(tmp_path, tiny_data_dir, trials=2)
    run = subprocess.run([sys.executable, "-m", "experiments", "compare", "run", str(spec_path),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (tmp_path / "tiny" / "studies.db").unlink()  # the report needs the records only
    report = tmp_path / "tiny" / "report.md"
    before = report.read_text()
    report.unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "experiments", "compare", "report", str(tmp_path / "tiny")],
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert report.read_text() == before


def test_a_surplus_trial_is_failed_without_error_and_never_counted(tiny_data_dir, tmp_path):
    """Two claims racing for the last slot of a budget of one: the later trial number yields."""
    import optuna

    from experiments.compare import _claim_trial, _distributions, _study

    spec = parse_spec(spec_dict(tiny_data_dir, trials=1))
    entry = spec.entry("adamw")
    out_dir = tmp_path / "tiny"
    out_dir.mkdir()
    study, storage = _study(spec, entry, f"sqlite:///{out_dir / 'studies.db'}")
    real_ask, others = study.ask, []

    def racing_ask(distributions):  # another worker asks between our budget check and our ask
        others.append(real_ask(distributions))
        return real_ask(distributions)

    study.ask = racing_ask
    second = _claim_trial(study, storage, entry, _distributions(entry.space))
    first = others[0]
    assert second is None  # the budget of one was taken first: ours is surplus
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {first.number: optuna.trial.TrialState.RUNNING, first.number + 1: optuna.trial.TrialState.FAIL}
    assert study.get_trials()[1].user_attrs["surplus"] is True


def test_conclusions_follow_the_numbers_and_name_divergences():
    import pandas as pd

    from analysis.compare import conclusions

    def comparison(a, b, statuses=None):
        rows = [{"entry": "adamw", "seed": s, "status": "finished", "test_loss": v} for s, v in enumerate(a)]
        rows += [{"entry": "vradam", "seed": s, "status": (statuses or {}).get(s, "finished"), "test_loss": v}
                 for s, v in enumerate(b)]
        return {"spec": parse_spec(spec_dict("/tmp")).to_dict(), "confirm": pd.DataFrame(rows),
                "tuning": pd.DataFrame()}

    lower = conclusions(comparison([1.0, 1.1, 1.2, 1.3], [0.5, 0.62, 0.69, 0.81]))
    assert lower[0].startswith("vradam's test_loss is lower than adamw's by 0.495") and "vradam is better" in lower[0]
    higher = conclusions(comparison([0.5, 0.62, 0.69, 0.81], [1.0, 1.1, 1.2, 1.3]))
    assert "is higher than" in higher[0] and "vradam is worse" in higher[0]
    same = conclusions(comparison([1.0, 1.1, 1.2, 1.3], [1.1, 1.0, 1.3, 1.2]))
    assert same[0].startswith("No difference at the 95% level")
    lost = conclusions(comparison([1.0, 1.1, 1.2, 1.3, 1.4], [0.5, 0.6, 0.7, 0.8, 0.9], {3: "diverged", 4: "diverged"}))
    assert "over 3 seeds" in lost[0] and "2 diverged seed(s) of vradam" in lost[0]
    assert "but it diverged more often" in lost[0]


def test_steps_to_target_reads_the_target_from_its_side():
    import pandas as pd

    from analysis.compare import tuning_score

    rows = pd.DataFrame({"step": [0, 100, 200, 300] * 2, "metric": ["val_acc"] * 4 + ["val_loss"] * 4,
                         "value": [0.5, 0.7, 0.86, 0.9, 2.0, 1.0, 0.5, 0.4]})
    assert tuning_score(rows, "steps_to_target", "finished", target=0.85, target_metric="val_acc") == 200
    assert tuning_score(rows, "steps_to_target", "finished", target=0.6, target_metric="val_loss") == 200
    assert tuning_score(rows, "steps_to_target", "finished", target=0.1, target_metric="val_loss") == math.inf
    assert tuning_score(rows, "val_acc", "diverged") == -math.inf


def test_a_spec_as_given_is_refused_in_one_line(tmp_path):
    """A comparison directory whose spec.json holds a spec as given (no defaults filled in): one line naming
    what is missing and what to do, no traceback."""
    from typer.testing import CliRunner

    from experiments.cli import app

    (tmp_path / "spec.json").write_text(json.dumps({"optimizers": {"adamw": {"space": {}}}, "metric": "val_loss"}))
    with pytest.raises(ValueError, match="lacks base, reference, report_metrics, target, target_metric, "
                                         "optimizers.adamw.base"):
        load_comparison(tmp_path)
    result = CliRunner().invoke(app, ["compare", "report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "eos compare run" in result.output
