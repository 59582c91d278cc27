"""One damaged record must not blind the readers to the others; no reader modifies a record."""

import hashlib
import logging

import pytest
from typer.testing import CliRunner

import analysis
from eos_toolkit import record as rec
from experiments.cli import app


def write_run(directory, name, steps=3):
    w = rec.RunWriter.create(directory / name, config={"task": "eos-fullbatch", "optimizer": "gd", "lr": 0.1})
    w.event("started", step=0)
    w.log_metrics([(s, "train_loss", 1.0 / (s + 1)) for s in range(steps)])
    w.event("finished", step=steps)
    w.close()
    return directory / name


def fingerprint(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["config", "metrics_row", "metrics_header", "environment", "density_row"])
def test_each_damage_kind_is_named_and_skipped_next_to_an_intact_run(tmp_path, damage, caplog):
    write_run(tmp_path, "good")
    bad = write_run(tmp_path, "bad")
    if damage == "config":
        (bad / "config.json").write_text('{"task": "eos-fullbatch", "optimizer": ')
        where = "config.json is not valid JSON (line 1 column"
    elif damage == "environment":
        (bad / "environment.json").write_text("not json")
        where = "environment.json is not valid JSON (line 1 column 1"
    elif damage == "metrics_row":
        lines = (bad / "metrics.csv").read_text().splitlines()
        lines.insert(2, "garbage,\x00,row")
        (bad / "metrics.csv").write_text("\n".join(lines) + "\n")
        where = "metrics.csv line 3: 'garbage,\\x00,row' is not a step,metric,value row"
    elif damage == "metrics_header":
        text = (bad / "metrics.csv").read_text().replace("step,metric,value", "when,what,how much", 1)
        (bad / "metrics.csv").write_text(text)
        where = "metrics.csv line 1: header"
    else:
        (bad / "density.csv").write_text("step,eigenvalue,density\n0,1.0,0.5\nzero,one,two\n")
        where = "density.csv line 3"
    before = fingerprint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        runs = analysis.load_runs(tmp_path)
    assert [r.run_id for r in runs] == ["good"]
    assert list(runs.damaged) == [str(bad)] and where in runs.damaged[str(bad)]
    assert any(where in message for message in caplog.messages)
    listed = CliRunner().invoke(app, ["runs", "list", str(tmp_path)])
    assert listed.exit_code == 0 and "damaged" in listed.output and "finished" in listed.output
    assert where.split(" (")[0].split(" line")[0] in listed.output  # the warning names the file
    assert fingerprint(tmp_path) == before  # readers never modify a record


def test_runs_list_of_an_empty_directory_says_so(tmp_path):
    result = CliRunner().invoke(app, ["runs", "list", str(tmp_path)])
    assert result.exit_code == 2 and f"no run records (directories with config.json) under {tmp_path}" in result.output
