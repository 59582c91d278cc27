"""The run-record format: durable appends, atomic writes, status from events, kill tolerance."""

import json
import os
import subprocess
import sys

import pytest

from eos_toolkit import record as rec


def test_round_trip_and_status(tmp_path):
    w = rec.RunWriter.create(tmp_path / "r", config={"task": "t", "lr": 0.1}, environment={"torch": "x"})
    w.event("started", step=0)
    w.log_metrics([(0, "train_loss", 2.0), (0, "sharpness", float("nan")), (1, "train_loss", float("inf"))])
    r = rec.read_run(tmp_path / "r")
    assert r.status == "incomplete"
    assert r.config == {"task": "t", "lr": 0.1}
    assert r.environment == {"torch": "x"}
    assert list(r.metrics.columns) == ["step", "metric", "value"]
    assert r.metrics["value"].iloc[0] == 2.0
    assert r.metrics["value"].isna().sum() == 1
    assert r.metrics["value"].iloc[2] == float("inf")
    w.event("diverged", step=1, reason="loss is inf")
    assert rec.read_run(tmp_path / "r").status == "diverged"
    w.event("resumed", step=1)
    assert rec.read_run(tmp_path / "r").status == "incomplete"
    w.event("finished", step=2)
    assert rec.read_run(tmp_path / "r").status == "finished"


def test_values_round_trip_exactly(tmp_path):
    w = rec.RunWriter.create(tmp_path, config={})
    values = [0.1, 1 / 3, 2.0**-40, 123456789.123456789]
    w.log_metrics([(i, "x", v) for i, v in enumerate(values)])
    assert rec.read_metrics(tmp_path)["value"].tolist() == values


def test_partial_last_lines_are_ignored_and_healed(tmp_path):
    w = rec.RunWriter.create(tmp_path, config={})
    w.event("started", step=0)
    w.log_metrics([(0, "train_loss", 1.0)])
    # Simulate a kill in the middle of a write.
    with open(tmp_path / rec.METRICS_FILE, "a") as f:
        f.write("1,train_lo")
    with open(tmp_path / rec.EVENTS_FILE, "a") as f:
        f.write('{"time": "x", "eve')
    r = rec.read_run(tmp_path)
    assert len(r.metrics) == 1 and [e["event"] for e in r.events] == ["started"]
    # The next append first cuts the partial line off; nothing else is lost.
    w.log_metrics([(1, "train_loss", 0.5)])
    w.event("finished", step=1)
    r = rec.read_run(tmp_path)
    assert r.metrics["value"].tolist() == [1.0, 0.5]
    assert r.status == "finished"


def test_truncate_after_checkpoint_and_dedupe(tmp_path):
    w = rec.RunWriter.create(tmp_path, config={})
    w.log_metrics([(s, "train_loss", float(s)) for s in range(6)])
    w.truncate_metrics_after(3)
    assert rec.read_metrics(tmp_path)["step"].tolist() == [0, 1, 2, 3]
    w.log_metrics([(3, "train_loss", 30.0)])
    df = rec.read_metrics(tmp_path)
    assert df["value"].tolist() == [0.0, 1.0, 2.0, 30.0]


def test_create_refuses_existing_and_open_requires_record(tmp_path):
    writer = rec.RunWriter.create(tmp_path / "a", config={})
    with pytest.raises(rec.RunLockedError, match=rf"being written by pid {os.getpid()} on "):
        rec.RunWriter.open(tmp_path / "a")  # one writer at a time
    writer.close()
    with pytest.raises(FileExistsError, match="already holds a run record"):
        rec.RunWriter.create(tmp_path / "a", config={})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        rec.RunWriter.open(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a run record"):
        rec.read_run(tmp_path / "b")


def test_atomic_json_keeps_old_file_when_serialisation_fails(tmp_path):
    p = tmp_path / "c.json"
    rec.write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError, match="cannot store"):
        rec.write_json_atomic(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["c.json"]


def test_find_runs(tmp_path):
    for name in ("x/r1", "x/r2", "y/deep/r3"):
        rec.RunWriter.create(tmp_path / name, config={})
    (tmp_path / "not_a_run").mkdir()
    assert [p.name for p in rec.find_runs(tmp_path)] == ["r1", "r2", "r3"]
    assert rec.find_runs(tmp_path / "x" / "r1") == [tmp_path / "x" / "r1"]


def test_record_module_does_not_import_torch():
    code = "import sys, eos_toolkit.record; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_density_curves_round_trip_and_truncate(tmp_path):
    w = rec.RunWriter.create(tmp_path, config={})
    assert rec.read_run(tmp_path).density.empty
    w.log_density(0, [-1.0, 0.0, 1.0], [0.25, 0.5, 0.25])
    w.log_density(10, [-1.0, 1.0], [0.5, 0.5])
    d = rec.read_density(tmp_path)
    assert d["step"].tolist() == [0, 0, 0, 10, 10]
    assert d.groupby("step")["density"].sum().tolist() == [1.0, 1.0]
    w.truncate_metrics_after(5)
    assert rec.read_density(tmp_path)["step"].tolist() == [0, 0, 0]
