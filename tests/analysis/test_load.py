"""Loading run records into tidy frames: columns, status, sources, unique ids, pivoting."""

import math

import pandas as pd
import pytest

import analysis
from tests.analysis.conftest import make_run

GD = {"task": "t", "optimizer": "gd", "lr": 0.1, "seed": 0}


def test_tidy_columns_config_and_status(tmp_path):
    config = {**GD, "vradam": {"beta3": 1.0, "alpha1": 4.0}, "betas": [0.9, 0.99]}
    make_run(tmp_path, "a", config, [(0, "train_loss", 2.0), (0, "sharpness", 3.0), (1, "train_loss", 1.0)])
    run = analysis.load_run(tmp_path / "a")
    assert run.status == "finished" and run.run_id == "a" and run.label == "gd lr=0.1"  # no label in the record: the config's own words
    df = run.df
    assert list(df.columns[:2]) == ["run_id", "status"] and list(df.columns[-3:]) == ["step", "metric", "value"]
    assert {"vradam.beta3", "vradam.alpha1", "betas", "label"} <= set(df.columns)
    assert (df["vradam.alpha1"] == 4.0).all() and (df["betas"] == "[0.9, 0.99]").all()
    assert run.metric("train_loss").to_dict() == {0: 2.0, 1: 1.0}
    assert run.metrics == ["sharpness", "train_loss"]


def test_half_written_and_diverged_runs_load_with_their_status(tmp_path):
    make_run(tmp_path, "div", GD, [(0, "train_loss", 1.0), (1, "train_loss", math.inf)],
             events=(("started", 0), ("diverged", 1)))
    killed = make_run(tmp_path, "killed", GD, [(0, "train_loss", 1.0)], events=(("started", 0),))
    with open(killed / "metrics.csv", "a") as f:
        f.write("1,train_lo")
    runs = analysis.load_runs(tmp_path)
    assert dict(zip(runs.overview["run_id"], runs.overview["status"])) == {"div": "diverged", "killed": "incomplete"}
    assert runs["div"].diverged_step == 1 and runs["killed"].diverged_step is None
    assert runs["div"].metric("train_loss").iloc[-1] == math.inf
    assert len(runs["killed"].df) == 1


def test_sources_parent_list_glob_and_unique_ids(tmp_path):
    for sweep in ("a", "b"):
        for seed in (0, 1):
            make_run(tmp_path / sweep, f"seed{seed}", {**GD, "seed": seed}, [(0, "train_loss", 1.0)])
    runs = analysis.load_runs(tmp_path)
    assert runs.run_ids == ["a/seed0", "a/seed1", "b/seed0", "b/seed1"]
    assert analysis.load_runs([tmp_path / "a" / "seed0", tmp_path / "b"]).run_ids == ["a/seed0", "b/seed0", "b/seed1"]
    assert analysis.load_runs(str(tmp_path / "a" / "seed*")).run_ids == ["seed0", "seed1"]
    assert len(analysis.load_runs([tmp_path / "a", tmp_path / "a" / "seed0"])) == 2  # no duplicates
    assert len(runs.select(seed=1)) == 2
    with pytest.raises(FileNotFoundError, match="nope"):
        analysis.load_runs(tmp_path / "nope*")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run records"):
        analysis.load_runs(tmp_path / "empty")


def test_config_keys_that_collide_with_tidy_columns_are_kept_apart(tmp_path):
    make_run(tmp_path, "r", {**GD, "step": 5, "status": "x"}, [(3, "train_loss", 1.0)])
    df = analysis.load_run(tmp_path / "r").df
    assert df["step"].tolist() == [3] and df["config.step"].tolist() == [5]
    assert df["status"].tolist() == ["finished"] and df["config.status"].tolist() == ["x"]


def test_wide_and_metric_series(tmp_path):
    make_run(tmp_path, "r1", GD, [(0, "train_loss", 2.0), (0, "sharpness", 3.0), (1, "train_loss", 1.0)])
    make_run(tmp_path, "r2", {**GD, "seed": 1}, [(0, "train_loss", 4.0)])
    df = analysis.load_runs(tmp_path).df
    w = analysis.wide(df)
    assert w[["run_id", "step"]].values.tolist() == [["r1", 0], ["r1", 1], ["r2", 0]]
    assert w["train_loss"].tolist() == [2.0, 1.0, 4.0]
    assert w["sharpness"].iloc[0] == 3.0 and w["sharpness"].iloc[1:].isna().all()
    assert analysis.metric_series(df, "train_loss", "r2").tolist() == [4.0]
    with pytest.raises(ValueError, match="pass run_id"):
        analysis.metric_series(df, "train_loss")


def test_run_label_and_flatten():
    # a record without a label (a run writes one from its optimizer's display name): the config's own words
    assert analysis.run_label({"optimizer": "vradam", "lr": 0.002}) == "vradam lr=0.002"
    assert analysis.run_label({"optimizer": "gd", "lr": 0.1, "label": "mine"}) == "mine"
    assert analysis.flatten_config({"a": {"b": {"c": 1}}, "d": None}) == {"a.b.c": 1, "d": None}


def test_density_is_tagged_with_the_run(tmp_path):
    make_run(tmp_path, "r", GD, [(0, "train_loss", 1.0)], density=[(0, [0.0, 1.0], [0.5, 0.5])])
    density = analysis.load_runs(tmp_path).density
    assert isinstance(density, pd.DataFrame)
    assert density.to_dict("list") == {"run_id": ["r", "r"], "step": [0, 0], "eigenvalue": [0.0, 1.0],
                                       "density": [0.5, 0.5]}
