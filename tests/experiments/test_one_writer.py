"""One writer per run record: real processes racing on one record, two sweeps on one directory, kill -9.

The two racing loops spawn processes that each import torch (seconds apiece): they are ``slow``.
"""

import json
import multiprocessing
import os
import signal
import time

import pytest

from eos_toolkit.record import RunLock, RunLockedError, read_metrics
from experiments.config import RunConfig
from experiments.resolve import resolve
from experiments.sweep import expand_sweep, run_sweep

TINY = {"task": "eos-fullbatch", "dataset": "fashion-mnist", "n_train": 60, "model_options": {"hidden": [6]},
        "track_every": 5, "chunk_size": 64, "device": "cpu", "steps": 10, "optimizer": "gd", "lr": 0.1}


def _train(cfg_dict, run_dir, queue):
    import torch

    from experiments.train import train

    torch.set_num_threads(1)
    try:
        queue.put(("ok", train(RunConfig.from_dict(cfg_dict), run_dir).status))
    except FileExistsError as exc:  # RunLockedError is one
        queue.put((type(exc).__name__, str(exc)))


def _sweep(spec, out):
    import torch

    torch.set_num_threads(1)
    run_sweep(expand_sweep(spec), out)


def assert_single_writer_record(run_dir):
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["started", "hvp_method", "finished"], events
    metrics = read_metrics(run_dir)
    assert not metrics.duplicated(["step", "metric"]).any()


@pytest.mark.slow
def test_two_processes_racing_on_one_record(tiny_data_dir, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    cfg = {**TINY, "data_dir": str(tiny_data_dir)}
    for trial in range(10):
        run_dir = tmp_path / f"race-{trial}"
        queue = ctx.Queue()
        procs = [ctx.Process(target=_train, args=(cfg, str(run_dir), queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sorted(r[0] for r in results) in (["RunLockedError", "ok"], ["FileExistsError", "ok"]), results
        loser = next(r for r in results if r[0] != "ok")
        assert "being written by pid" in loser[1] or "already holds a run record" in loser[1]
        assert_single_writer_record(run_dir)


@pytest.mark.slow
def test_two_sweeps_on_one_directory(tiny_data_dir, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    spec = {"base": {**TINY, "data_dir": str(tiny_data_dir)}, "grid": [{"optimizer": "gd", "lr": [0.05, 0.1, 0.2]}],
            "seeds": [0]}
    for trial in range(5):
        out = tmp_path / f"sweep-{trial}"
        procs = [ctx.Process(target=_sweep, args=(spec, str(out))) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
            assert p.exitcode == 0
        runs = sorted(out.iterdir())
        assert len(runs) == 3  # no run lost
        for run_dir in runs:  # none trained twice, none reopened after it finished
            assert_single_writer_record(run_dir)


def _hold_lock(run_dir, ready):
    RunLock(run_dir)
    ready.set()
    time.sleep(60)


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "r"), ready))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} on "):
        RunLock(tmp_path / "r")
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    RunLock(tmp_path / "r").release()  # the kernel released it


def test_default_run_names_never_collide(tmp_path):
    from experiments.train import default_run_dir

    cfg = resolve(RunConfig(**TINY))
    paths = {default_run_dir(cfg, tmp_path) for _ in range(5)}
    assert len(paths) == 5 and all(p.is_dir() for p in paths)
