"""The step benchmark compares like with like: its naive VRAdam is the same math."""

from __future__ import annotations

import torch

from experiments.benchmarks.optimizer_step import (
    NaiveSyncVRAdam,
    gpt2_small_shapes,
    main,
    time_steps,
)
from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam


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
