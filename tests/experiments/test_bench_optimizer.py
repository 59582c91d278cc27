"""The optimizer-step benchmarks: their naive VRAdam is the same math, and they run on tiny shapes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.benchmarks.optimizer_step import (
    NaiveSyncVRAdam,
    gpt2_small_shapes,
    main,
    time_steps,
)
from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_PYTHONPATH = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (optional extra 'fused')")


def test_naive_sync_vradam_takes_the_same_steps_as_vradam():
    params = make_params(seed=11)
    twins = clone_params(params)
    opt = VRAdam([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.05)
    naive = NaiveSyncVRAdam([{"params": twins[:2]}, {"params": twins[2:], "lr": 0.02}], lr=0.05)
    for _ in range(6):
        fill_grads(params)
        fill_grads(twins)
        opt.step()
        naive.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_gpt2_small_shapes_are_gpt2_small():
    shapes = gpt2_small_shapes(1.0)
    assert len(shapes) == 148
    assert sum(torch.Size(s).numel() for s in shapes) == 124_439_808


def test_benchmark_runs_on_a_tiny_set(capsys):
    timings = time_steps([(3, 4), (5,)], torch.device("cpu"), repeats=2, warmup=1)
    names = {t.name for t in timings}
    assert {"adamw_foreach", "vradam_foreach", "vradam_naive_sync"} <= names
    assert next(t for t in timings if t.name == "adamw_foreach").ratio == 1.0
    main(["--device", "cpu", "--scale", "0.01", "--repeats", "1", "--warmup", "0"])
    assert "vradam_foreach" in capsys.readouterr().out


@needs_triton
@pytest.mark.slow
def test_fused_step_benchmark_runs_through_the_interpreter():
    """The benchmark's CPU-reachable code (checks, sweep, table) on tiny shapes."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=CHILD_PYTHONPATH)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.fused_step", "--device", "cpu",
         "--scale", "0.005"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused vs foreach after 3 steps" in proc.stdout and ": ok" in proc.stdout
    assert "vradam_lagged (functional)" in proc.stdout
