"""Hessian products over data sharded across two gloo ranks equal the single-process products.

Each rank holds a different, unequal part of the data (rank 0: 7 examples in
two chunks, rank 1: 13 in one); the operator's weights are global and every
product is all-reduced, so Lanczos and Hutchinson, run on every rank with an
identically seeded generator, must give the single-process answers (float64:
the sums differ only in their order of additions, about 1e-16 relative).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import eos_toolkit.method_choice as method_choice
from eos_toolkit.hvp import hessian_operator
from eos_toolkit.solvers import hutchinson_trace, lanczos
from eos_toolkit.tracker import SharpnessTracker
from tests.eos_toolkit.reference import dense_hessian, regression_data, tanh_mlp
from tests.spawn import needs_gloo, spawn_ranks

mse = nn.functional.mse_loss
pytestmark = needs_gloo


def shards(rank: int):
    x, y = regression_data(20, 5, 3)
    return [(x[:4], y[:4]), (x[4:7], y[4:7])] if rank == 0 else [(x[7:], y[7:])]


def solve(op) -> dict:
    res = lanczos(op, 3, tol=1e-12, max_iter=op.dim, generator=torch.Generator().manual_seed(0))
    trace, error = hutchinson_trace(op, n_samples=30, generator=torch.Generator().manual_seed(1))
    return {"eigenvalues": res.eigenvalues, "n_matvecs": res.n_matvecs, "trace": trace, "error": error}


def on_shards(rank: int, world_size: int, out_dir) -> None:
    group = torch.distributed.group.WORLD
    op = hessian_operator(tanh_mlp(), mse, shards(rank), process_group=group, debug_replicated=True)
    found = solve(op)
    tracker = SharpnessTracker(tanh_mlp(), mse, shards(rank), k=2, tol=1e-10, process_group=group)
    found["tracker"] = tracker.measure()
    found["method"] = tracker.hessian.method
    # Different vectors on the ranks: the debug check must refuse them on every rank.
    try:
        op.matvec(torch.full((op.dim,), float(rank + 1), dtype=torch.float64))
        found["refused"] = None
    except RuntimeError as err:
        found["refused"] = str(err)
    # The debug flag set on one rank only: every rank runs the check (else their collectives would differ).
    if rank == 0:
        os.environ["EOS_DEBUG_DISTRIBUTED"] = "1"
    one_sided = hessian_operator(tanh_mlp(), mse, shards(rank), process_group=group)
    os.environ.pop("EOS_DEBUG_DISTRIBUTED", None)
    found["debug_everywhere"] = one_sided.debug_replicated
    found["one_sided_product"] = one_sided.matvec(torch.ones(one_sided.dim, dtype=torch.float64))
    # A summed loss, one chunk per rank: the mean check must run across ranks and stop both, rank 1
    # too, whose one-example chunk cannot show it (the sum of one loss is its mean).
    x, y = regression_data(20, 5, 3)
    mine = [(x[:10], y[:10])] if rank == 0 else [(x[10:11], y[10:11])]
    try:
        hessian_operator(tanh_mlp(), lambda o, t: mse(o, t, reduction="sum"), mine, process_group=group)
        found["sum_refused"] = None
    except ValueError as err:
        found["sum_refused"] = str(err)
    # The tracker handed the DDP wrapper measures the model inside it.
    wrapped = torch.nn.parallel.DistributedDataParallel(tanh_mlp())
    found["wrapped"] = SharpnessTracker(wrapped, mse, shards(rank), k=1, tol=1e-10, process_group=group,
                                        method="double_backward").measure()["sharpness"]
    # Arithmetic that differs between ranks: rank 1 alone sees reuse_graph off by 2e-5 (above AUTO_RTOL) in
    # the method choice. The ranks must still choose the same method, or their collectives would part.
    real_timed = method_choice._timed

    def skewed(op, name, x, failed):
        ran = real_timed(op, name, x, failed)
        if ran is not None and name == "reuse_graph" and rank == 1:
            ran = ((1 + 2e-5) * ran[0], ran[1])
        return ran

    method_choice._timed = skewed
    try:
        skew = SharpnessTracker(tanh_mlp(), mse, shards(rank), k=2, tol=1e-10, process_group=group)
        found["skewed"] = skew.measure()
        found["skewed_choice"] = skew.method_choice
    finally:
        method_choice._timed = real_timed
    torch.save(found, out_dir / f"rank{rank}.pt")


def single_product() -> torch.Tensor:
    x, y = regression_data(20, 5, 3)
    op = hessian_operator(tanh_mlp(), mse, [(x, y)])
    return op.matvec(torch.ones(op.dim, dtype=torch.float64))


def test_distributed_lanczos_hutchinson_and_tracker_equal_one_process(tmp_path):
    spawn_ranks(on_shards, tmp_path, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    x, y = regression_data(20, 5, 3)
    single = solve(hessian_operator(tanh_mlp(), mse, [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])]))
    exact = torch.linalg.eigvalsh(dense_hessian(tanh_mlp(), mse, x, y)).flip(0)[:3]
    for found in ranks:
        assert torch.allclose(found["eigenvalues"], single["eigenvalues"], rtol=1e-8, atol=0)
        assert torch.allclose(found["eigenvalues"], exact, rtol=1e-8, atol=0)
        assert found["trace"].item() == pytest.approx(single["trace"].item(), rel=1e-12)
        assert found["error"].item() == pytest.approx(single["error"].item(), rel=1e-9)
        assert found["tracker"]["sharpness"] == pytest.approx(exact[0].item(), rel=1e-8)
        assert "different vectors" in found["refused"]
    for found in ranks:
        assert found["debug_everywhere"] is True
        assert torch.allclose(found["one_sided_product"], single_product(), rtol=1e-12)
        assert "not an unweighted mean" in found["sum_refused"]
        assert found["wrapped"] == pytest.approx(exact[0].item(), rel=1e-8)
    assert "another rank's chunks" in ranks[1]["sum_refused"] and "chunk 0" in ranks[0]["sum_refused"]
    # Every rank ran the same solve: identical numbers, product counts and method choice.
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    assert ranks[0]["n_matvecs"] == ranks[1]["n_matvecs"] and ranks[0]["method"] == ranks[1]["method"]
    assert ranks[0]["tracker"]["hessian_matvecs"] == ranks[1]["tracker"]["hessian_matvecs"]
    # Rank 1's skewed reuse_graph: both ranks see its largest error, neither chooses it, same solve.
    skewed = [found["skewed_choice"] for found in ranks]
    assert skewed[0] == skewed[1] and skewed[0]["method"] != "reuse_graph"
    assert skewed[0]["timings"]["reuse_graph"]["relative_error"] >= 1.9e-5
    same = ("hessian_eig_1", "hessian_eig_2", "hessian_matvecs", "hessian_converged")
    assert [ranks[0]["skewed"][key] for key in same] == [ranks[1]["skewed"][key] for key in same]
    assert ranks[0]["skewed"]["sharpness"] == pytest.approx(exact[0].item(), rel=1e-8)
