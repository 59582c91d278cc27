"""The benchmarks' timing: jobs take turns, warm-up rounds are left out, batches are divided out (a fake clock)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from experiments.benchmarks import timing


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when a job says how long it took."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def job(clock, calls: list, name: str, costs: list[float]):
    costs = iter(costs)

    def run():
        calls.append(name)
        clock[0] += next(costs)
        return name

    return run


def test_interleaved_medians_take_turns_and_leave_out_the_warmup(clock):
    calls = []
    jobs = {"a": job(clock, calls, "a", [100, 1, 2, 3]), "b": job(clock, calls, "b", [100, 5, 5, 9])}
    medians = timing.interleaved_medians(jobs, "cpu", repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert medians == {"a": 2, "b": 5}


def test_a_batch_is_timed_as_one_sample_per_call(clock):
    calls = []
    medians = timing.interleaved_medians({"c": job(clock, calls, "c", [1, 3] * 3)}, "cpu", repeats=3, warmup=0,
                                         per_batch=2)
    assert len(calls) == 6 and medians == {"c": 2}


def test_timed_returns_the_result_and_a_stopwatch_splits_without_stopping(clock):
    calls = []
    assert timing.timed(job(clock, calls, "x", [4]), "cpu") == ("x", 4)
    with timing.Stopwatch("cpu") as watch:
        clock[0] += 1
        split = watch.lap()
        clock[0] += 2
    assert (split, watch.seconds) == (1, 3)
