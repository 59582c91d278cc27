"""The peer adapters of the sharpness benchmark against dense Hessians and independently counted products.

Each peer test needs the peer installed (``pip install "eos-toolkit[bench]"``
and ``pip install --no-deps curvlinops-for-pytorch``) and is skipped without
it; the selection of the best accurate peer, the skip path and the config
parser run everywhere.  Nothing here is timed.
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from experiments.benchmarks import peers
from experiments.benchmarks.peers import (
    PEERS,
    PeerResult,
    best_accurate,
    peer_availability,
    ratios,
)
from experiments.benchmarks.sharpness import parse_config

DT = torch.float64
mse = nn.functional.mse_loss


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def tiny_data(n: int = 40):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)


def dense_hessian(model: nn.Module, x, y) -> torch.Tensor:
    """The dense Hessian of the full-batch mean MSE in all parameters, by torch.autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat):
        parts = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return mse(functional_call(model, parts, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss_of, theta)


def dense_top_eigenvalue(model: nn.Module, x, y) -> tuple[float, float]:
    """(largest, smallest) eigenvalue of the dense Hessian."""
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    return float(eigenvalues[-1]), float(eigenvalues[0])


class ForwardCounter:
    """Counts calls of the model's forward (a hook: it sees calls under autograd and torch.func alike)."""

    def __init__(self, model: nn.Module):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()


def needs(peer_name: str):
    pytest.importorskip(PEERS[peer_name].module)
    return PEERS[peer_name]


SPLITS = {"one chunk": [40], "unequal chunks": [10, 30]}
# Each peer's tol, and the relative error that tol guarantees on this model: the residual rules
# (eigenthings, ARPACK) bound the error by tol.  PyHessian's change rule bounds nothing, and its
# normalisation divides by |v| + 1e-6, so the unit vector it multiplies is short by about 1e-6 and
# its Rayleigh quotient about 2e-6 (relative) low however small tol is: a tiny tol, and 1e-5 allowed.
ACCURACY = {"pyhessian_power": (1e-10, 1e-5), "eigenthings_lanczos": (1e-8, 1e-8),
            "eigenthings_power": (1e-8, 1e-8), "curvlinops_eigsh": (1e-8, 1e-8)}


def split(x, y, sizes):
    chunks, start = [], 0
    for n in sizes:
        chunks.append((x[start:start + n], y[start:start + n]))
        start += n
    return chunks


@pytest.mark.parametrize("split_name", SPLITS)
@pytest.mark.parametrize("peer_name", PEERS)
def test_peer_matches_dense_hessian_and_counts_its_products(peer_name, split_name):
    peer = needs(peer_name)
    model, (x, y) = tiny_model(), tiny_data()
    largest, smallest = dense_top_eigenvalue(model, x, y)
    assert largest > abs(smallest)  # so the largest-magnitude solvers look for the same eigenvalue
    chunks = split(x, y, SPLITS[split_name])
    tol, allowed = ACCURACY[peer_name]
    counter = ForwardCounter(model)
    result = peer.run(model, mse, chunks, tol=tol, max_iter=1000, seed=0)
    counter.remove()
    assert isinstance(result, PeerResult) and result.converged, result
    assert abs(result.eigenvalue - largest) <= allowed * largest, (result.eigenvalue, largest)
    assert result.products > 0
    if peer_name == "pyhessian_power" and len(chunks) == 1:
        # data=: one forward builds the graph of the gradient; every product reuses it.
        assert counter.calls == 1
    else:
        # Every product runs the model once per chunk (its forward, then second derivatives).
        assert counter.calls == len(chunks) * result.products, (counter.calls, result.products)


def test_pyhessian_counts_every_product_up_to_its_budget():
    peer = needs("pyhessian_power")
    model, (x, y) = tiny_model(), tiny_data()
    result = peer.run(model, mse, [(x, y)], tol=0.0, max_iter=7, seed=0)  # tol 0: its rule never fires
    assert result.products == 7 and not result.converged
    assert result.stop_reason == "maxIter=7 reached"


def test_eigenthings_lanczos_counts_every_restart():
    peer = needs("eigenthings_lanczos")
    model, (x, y) = tiny_model(), tiny_data()
    result = peer.run(model, mse, [(x, y)], tol=1e-8, max_iter=1000, seed=0)
    sizes = [int(s) for s in re.search(r"sizes ([\d+]+)", result.stop_reason).group(1).split("+")]
    assert sizes[0] == 2 and all(b == 2 * a for a, b in itertools.pairwise(sizes))
    assert result.products == sum(sizes)
    fixed = peers.eigenthings_lanczos(model, mse, [(x, y)], tol=1e-8, max_iter=12, seed=0, first_size=12)
    assert fixed.products == 12


def test_pyhessian_leaves_the_model_as_found():
    peer = needs("pyhessian_power")
    model, (x, y) = tiny_model(), tiny_data()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in model.parameters()]
    peer.run(model, mse, [(x, y)], tol=1e-3, max_iter=5, seed=0)  # it switches to eval and writes .grad
    assert model.training
    assert all(p.grad is g and bool((g == 7.0).all()) for p, g in zip(model.parameters(), grads))


def test_a_start_vector_is_used():
    model, (x, y) = tiny_model(), tiny_data()
    top = torch.linalg.eigh(dense_hessian(model, x, y)).eigenvectors[:, -1]
    if peer_availability()["eigenthings_power"] is None:
        # Started at the answer, power iteration stops at its first test (the second product).
        cold = PEERS["eigenthings_power"].run(model, mse, [(x, y)], tol=1e-8, max_iter=1000, seed=0)
        warm = PEERS["eigenthings_power"].run(model, mse, [(x, y)], tol=1e-8, max_iter=1000, seed=0, v0=top)
        assert warm.products == 2 < cold.products and warm.eigenvalue == pytest.approx(cold.eigenvalue, rel=1e-8)
    if peer_availability()["curvlinops_eigsh"] is None:
        # ARPACK builds its whole first basis (ncv = min(n, 20) vectors) whatever the start: no saving.
        warm = PEERS["curvlinops_eigsh"].run(model, mse, [(x, y)], tol=1e-8, max_iter=1000, seed=0, v0=top)
        assert warm.products >= 20 and warm.converged
    with pytest.raises(ValueError, match="v0 has 3 entries"):
        peers._start_vector(57, 0, torch.ones(3), DT, torch.device("cpu"))


@pytest.mark.parametrize("peer_name", PEERS)
def test_bad_values_are_named(peer_name):
    peer = needs(peer_name)
    model, (x, y) = tiny_model(), tiny_data()
    with pytest.raises(ValueError, match="tol"):
        peer.run(model, mse, [(x, y)], tol=-1.0, max_iter=10, seed=0)
    with pytest.raises(ValueError, match="max_iter"):
        peer.run(model, mse, [(x, y)], tol=1e-3, max_iter=0, seed=0)
    with pytest.raises(ValueError, match="chunks is empty"):
        peer.run(model, mse, [], tol=1e-3, max_iter=10, seed=0)


def test_missing_peer_is_skipped_with_a_reason(monkeypatch):
    for peer in PEERS.values():
        monkeypatch.setitem(sys.modules, peer.module, None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "pyhessian.hessian", None)
    model, (x, y) = tiny_model(), tiny_data()
    for name, peer in PEERS.items():
        assert peer.run(model, mse, [(x, y)], tol=1e-3, max_iter=10, seed=0) is None
        reason = peer_availability()[name]
        assert reason is not None and peer.module in reason and "pip install" in reason


def test_best_accurate_peer_is_the_fastest_within_the_target():
    rows = {  # name -> (products, seconds, relative error)
        "fast but wrong": (10, 0.1, 5e-3),
        "accurate, slow": (20, 2.0, 1e-9),
        "accurate, fastest": (60, 0.5, 9e-4),
        "no answer": (5, 0.05, float("nan")),
    }
    best = best_accurate(rows, 1e-3)
    assert best == "accurate, fastest"
    shares = ratios(rows, best)
    assert shares["accurate, slow"] == pytest.approx((20 / 60, 2.0 / 0.5))
    assert shares[best] == (1.0, 1.0)
    assert best_accurate({"a": (1, 1.0, 1e-2)}, 1e-3) is None
    # Equal seconds: fewer products wins.
    assert best_accurate({"a": (30, 1.0, 0.0), "b": (20, 1.0, 0.0)}, 1e-3) == "b"
    assert all(math.isnan(r) for pair in ratios(rows, None).values() for r in pair)  # no best row


def test_configs_parse_and_bad_ones_are_named():
    assert parse_config("mlp-init") == ("mlp-init", "mlp", 0)
    assert parse_config("mlp-trained") == ("mlp-trained", "mlp", 200)
    assert parse_config("cnn") == ("cnn", "cnn", 0)
    assert parse_config("cnn:20") == ("cnn:20", "cnn", 20)
    for bad in ("resnet", "mlp:-1", "mlp:", "cnn:x"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            parse_config(bad)


def test_peer_section_runs_end_to_end_on_a_tiny_model(capsys):
    """The whole peer section (reference, peers where installed, ours cold, first of a run, both warm rows, the
    overhead) on a small float32 MLP: every goal line is printed, and ours is within the accuracy target."""
    from experiments.benchmarks import sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(2)
    chunks = [(torch.randn(64, 12, generator=g), torch.randn(64, 4, generator=g))]
    settings = sharpness.PeerSettings(seed=0, lr=0.05, tols=(1e-3,), max_iter=20, trials=1, reference_iter=60,
                                      warm_steps=2)
    verdict = sharpness.peer_table("tiny", model, chunks, settings)
    out = capsys.readouterr().out
    assert sharpness.SAME_START in out and sharpness.OWN_START in out
    for goal in ("ours cold", "ours first of a run", "ours warm from its own previous vector <= 5 products",
                 "solver overhead", "ours warm during a run <= 5 products per measurement"):
        assert any(text.startswith(goal) for text in verdict), goal  # compared, or SKIP without peers
    # Against the warm peers, or (installed peers that take no start vector) against the cold best.
    assert any(text.startswith(("ours warm, same start", "ours warm (no installed peer")) for text in verdict)
    run = re.search(r"products per measurement \[([\d, ]+)\]", out)
    assert run and len(run.group(1).split(",")) == 1 + settings.warm_steps
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ours ")}
    for name in ("ours cold", "ours first of a run", sharpness.SAME_START, sharpness.OWN_START):
        error = float(rows[name].split()[len(name.split()) + 2])
        assert error <= sharpness.REL_TARGET, rows[name]
    overhead = next(text for text in verdict if text.startswith("solver overhead"))
    assert re.search(r"\(-?[\d.]+%, .*without reorthogonalisation: -?[\d.]+%\)$", overhead), overhead


def test_three_term_floor_is_a_lanczos():
    """The overhead baseline computes what a Lanczos computes: after as many products as the dimension, the top
    Ritz pair of a diagonal matrix is its largest entry and that coordinate vector (closed form)."""
    from experiments.benchmarks.sharpness import three_term_lanczos

    diagonal = torch.tensor([0.5, -2.0, 3.0, 1.0, 2.5, -1.0], dtype=torch.float64)
    value, vector = three_term_lanczos(lambda v: diagonal * v, 6, 6, torch.float64, "cpu",
                                       torch.Generator().manual_seed(0))
    assert value == pytest.approx(3.0, abs=1e-10)
    assert vector.abs().tolist() == pytest.approx([0, 0, 1, 0, 0, 0], abs=1e-8)
    value, _ = three_term_lanczos(lambda v: diagonal * v, 6, 1, torch.float64, "cpu", torch.Generator().manual_seed(0))
    assert -2.0 <= value <= 3.0  # one product: the Rayleigh quotient of the start vector
