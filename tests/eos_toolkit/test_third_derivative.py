"""Third derivatives of the loss, D^3 L[a, b, .], and the gradient of the sharpness, in float64.

Independent answers:

* central differences of ``a^T H(w +- h e) b`` along random directions ``e``,
  with ``H b`` from ``torch.autograd.functional.vhp`` (``b^T H``, ``H`` being
  symmetric) on the loss written as a function of the flat parameters,
  Richardson-extrapolated from ``h = 1e-3`` and ``h/2`` (observed: within
  5e-9 relative of the exact value; checked to 1e-7);
* the exact directional derivative ``d/dt a^T H(w + t e) b`` by forward mode
  over forward mode over reverse mode (``torch.func``), the loss written by
  hand (``jvp`` nested twice fails inside ``F.mse_loss``'s derivative); the
  operator computes reverse mode three times over, so the two share no
  composition;
* the closed form ``D^3 L = T`` of a cubic ``L(w) = T(w, w, w) / 6``;
* the sharpness gradient against central differences of ``eigvalsh`` of the
  dense Hessian (``torch.autograd.functional.hessian``) at ``w +- h e``.

Models: the tanh MLP, the small CNN with BatchNorm on running statistics and
the causal Transformer block of tests/eos_toolkit/reference.py, the block with
its LayerNorms written in plain tensor operations (torch's fused layer norm
has wrong third derivatives, which
:func:`test_torch_fused_norms_still_have_wrong_third_derivatives` measures
and the operator refuses).
"""
from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
from torch import nn
from torch.func import functional_call

import eos_toolkit.hvp
from eos_toolkit.collectives import Collective
from eos_toolkit.curvature_gradient import (
    preconditioned_sharpness_gradient,
    sharpness_gradient,
    wrong_third_derivative_modules,
)
from eos_toolkit.hvp import hessian_operator
from eos_toolkit.modes import KernelFallbackWarning
from eos_toolkit.operators import preconditioned_operator
from eos_toolkit.solvers import lanczos
from tests.eos_toolkit.reference import (
    DT,
    CausalBlock,
    SmallCNN,
    cnn_loss_plain,
    flat_params,
    regression_data,
    split_flat,
    tanh_mlp,
)
from tests.spawn import needs_gloo, spawn_ranks

mse = nn.functional.mse_loss


def mse_by_hand(out, y):
    return ((out - y) ** 2).mean()


class PlainLayerNorm(nn.Module):
    """LayerNorm over the last dimension in plain tensor operations (biased variance, eps inside the root)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt((centred ** 2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def plain_block(fused: bool = False) -> CausalBlock:
    """The reference Transformer block with plain LayerNorms, away from LayerNorm's initial weights."""
    torch.manual_seed(0)
    block = CausalBlock(fused=fused)
    block.ln1, block.ln2 = PlainLayerNorm(4), PlainLayerNorm(4)
    block = block.to(DT)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


def flat_loss(model: nn.Module, x, y, loss=mse_by_hand):
    """``w -> loss(model(x; w), y)`` on the flat vector of all parameters, the model used as it is."""
    names = [n for n, _ in model.named_parameters()]
    return lambda flat: loss(functional_call(model, split_flat(flat, model, names), (x,)), y)


def vectors(n: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, generator=g, dtype=DT) for _ in range(n)]


def central_difference(f, w, a, b, e, h: float = 1e-3) -> float:
    """``d/dt a^T H(w + t e) b`` at 0: central differences at h and h/2, Richardson-extrapolated."""
    def product(t):
        return float(torch.autograd.functional.vhp(f, w + t * e, b)[1] @ a)

    wide = (product(h) - product(-h)) / (2 * h)
    narrow = (product(h / 2) - product(-h / 2)) / h
    return (4 * narrow - wide) / 3


def forward_mode_derivative(f, w, a, b, e) -> float:
    """``d/dt a^T H(w + t e) b`` at 0, exactly: jvp of ``a . jvp(grad f)`` (forward over forward over reverse)."""
    def along_b(v):
        return a @ torch.func.jvp(torch.func.grad(f), (v,), (b,))[1]

    return float(torch.func.jvp(along_b, (w,), (e,))[1])


def mlp_case():
    x, y = regression_data(12, 5, 3)
    return tanh_mlp(), x, y


def cnn_case():
    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    x, y = torch.randn(6, 1, 6, 6, dtype=DT), torch.randn(6, 3, dtype=DT)
    model.train()
    model(x)  # non-trivial running statistics
    return model, x, y


def block_case():
    g = torch.Generator().manual_seed(1)
    return plain_block(), torch.randn(2, 5, 4, generator=g, dtype=DT), torch.randn(2, 5, 4, generator=g, dtype=DT)


CASES = {"tanh_mlp": mlp_case, "cnn_batchnorm_eval": cnn_case, "transformer_block": block_case}


def reference_loss(name, model, x, y):
    if name == "cnn_batchnorm_eval":  # BatchNorm spelled out by hand, on running statistics
        return lambda flat: cnn_loss_plain(flat, model, x, y, batch_stats=False)
    return flat_loss(model, x, y)


@pytest.mark.parametrize("name", CASES)
def test_equals_central_differences_and_forward_mode_derivatives(name):
    model, x, y = CASES[name]()
    op = hessian_operator(model, mse, [(x, y)])
    f, w = reference_loss(name, model, x, y), flat_params(model, [n for n, _ in model.named_parameters()])
    a, b, e1, e2 = vectors(4, op.dim)
    third = op.third_derivative(a, b)
    assert third.shape == (op.dim,) and third.dtype == DT
    for e in (e1, e2):
        exact = forward_mode_derivative(f, w, a, b, e)
        assert float(third @ e) == pytest.approx(exact, rel=1e-10, abs=1e-12 * float(third.norm() * e.norm()))
        assert float(third @ e) == pytest.approx(central_difference(f, w, a, b, e), rel=1e-7)
    assert op.n_third_derivatives == 1 and op.n_matvecs == 0


def test_the_whole_vector_equals_forward_mode_derivatives_along_every_coordinate():
    model, x, y = mlp_case()
    op = hessian_operator(model, mse, [(x, y)])
    f, w = flat_loss(model, x, y), flat_params(model, [n for n, _ in model.named_parameters()])
    a, b = vectors(2, op.dim, seed=1)

    def along_b(v):
        return a @ torch.func.jvp(torch.func.grad(f), (v,), (b,))[1]

    expected = torch.func.jacfwd(along_b)(w)  # every coordinate direction e_k by forward mode
    third = op.third_derivative(a, b)
    assert (third - expected).abs().max() <= 1e-10 * expected.abs().max()
    # Symmetric in a and b, and b defaults to a.
    assert torch.allclose(op.third_derivative(b, a), third, rtol=1e-12, atol=1e-13 * float(third.abs().max()))
    assert torch.equal(op.third_derivative(a), op.third_derivative(a, a))


class Cubic(nn.Module):
    """Per example ``n``: ``T_n(w, w, w) / 6 + (v . z_n)^2 / 2 + c . z_n``, with ``x_n = (T_n, z_n)``.

    The mean loss over examples has ``D^3 L = mean_n T_n`` on ``w`` and zero
    wherever ``v`` (quadratic) or ``c`` (linear) enters.
    """

    def __init__(self, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=DT))
        self.v = nn.Parameter(torch.randn(d, generator=g, dtype=DT))
        self.c = nn.Parameter(torch.randn(d, generator=g, dtype=DT))

    def forward(self, T, z):
        w = self.w
        return torch.einsum("nijk,i,j,k->n", T, w, w, w) / 6 + (z @ self.v) ** 2 / 2 + z @ self.c


def symmetric_tensors(n: int, d: int, seed: int = 5) -> torch.Tensor:
    """``n`` random tensors of shape (d, d, d), each symmetric under every permutation of its indices."""
    R = torch.randn(n, d, d, d, generator=torch.Generator().manual_seed(seed), dtype=DT)
    perms = ("nijk", "nikj", "njik", "njki", "nkij", "nkji")
    return sum(torch.einsum(f"{p}->nijk", R) for p in perms) / 6


def test_a_cubic_has_its_tensor_as_third_derivative_over_unequal_chunks():
    d, n = 4, 7
    T, z = symmetric_tensors(n, d), torch.randn(n, d, generator=torch.Generator().manual_seed(6), dtype=DT)
    targets = torch.zeros(n, dtype=DT)
    model = Cubic(d)

    def loss(out, y):
        return (out + y).mean()

    chunks = [((T[:2], z[:2]), targets[:2]), ((T[2:], z[2:]), targets[2:])]
    op = hessian_operator(model, loss, chunks)
    a, b = vectors(2, op.dim, seed=2)
    aw, bw = a[:d], b[:d]  # w comes first in named_parameters()
    expected = torch.cat([torch.einsum("nijk,i,j->nk", T, aw, bw).mean(0), torch.zeros(2 * d, dtype=DT)])
    assert torch.allclose(op.third_derivative(a, b), expected, rtol=0, atol=1e-13 * float(expected.abs().max()))
    # In the direction of w alone the third derivative is T(a, a, .) (b defaults to a).
    expected_aa = torch.einsum("nijk,i,j->nk", T, aw, aw).mean(0)
    assert torch.allclose(op.third_derivative(a)[:d], expected_aa, rtol=0, atol=1e-13 * float(expected_aa.abs().max()))


def test_a_quadratic_loss_has_zero_third_derivative():
    x, y = regression_data(8, 5, 3)
    model = nn.Linear(5, 3).to(DT)
    op = hessian_operator(model, mse, [(x[:3], y[:3]), (x[3:], y[3:])])
    a, b = vectors(2, op.dim)
    assert torch.equal(op.third_derivative(a, b), torch.zeros(op.dim, dtype=DT))


def test_unequal_chunks_give_the_full_batch_answer():
    model, x, y = mlp_case()
    chunked = hessian_operator(model, mse, [(x[:5], y[:5]), (x[5:7], y[5:7]), (x[7:], y[7:])])
    f, w = flat_loss(model, x, y), flat_params(model, [n for n, _ in model.named_parameters()])
    a, b, e = vectors(3, chunked.dim, seed=3)
    third = chunked.third_derivative(a, b)
    assert float(third @ e) == pytest.approx(forward_mode_derivative(f, w, a, b, e), rel=1e-10)
    whole = hessian_operator(model, mse, [(x, y)]).third_derivative(a, b)
    assert torch.allclose(third, whole, rtol=1e-11, atol=1e-12 * float(whole.abs().max()))


def test_fused_attention_falls_back_to_math_attention():
    """Fused attention has no double backward on CPU: the plain-kernel fallback of the products applies."""
    model, x, y = block_case()
    fused = copy.deepcopy(model)
    fused.fused = True
    op = hessian_operator(fused, mse, [(x, y)])
    a, b, e = vectors(3, op.dim, seed=4)
    with pytest.warns(KernelFallbackWarning, match="math attention"):
        third = op.third_derivative(a, b)
    assert op.kernel_fallback is not None
    w = flat_params(model, [n for n, _ in model.named_parameters()])
    assert float(third @ e) == pytest.approx(forward_mode_derivative(flat_loss(model, x, y), w, a, b, e), rel=1e-10)


def test_a_float32_model_with_float64_vectors():
    """Vectors in and out in the operator's dtype; float32 arithmetic inside (observed 2e-7 relative)."""
    model, x, y = mlp_case()
    op = hessian_operator(copy.deepcopy(model).float(), mse, [(x.float(), y.float())], dtype=DT)
    a, b, e = vectors(3, op.dim, seed=5)
    third = op.third_derivative(a.float(), b)
    assert third.dtype == DT
    w = flat_params(model, [n for n, _ in model.named_parameters()]).float().double()  # the float32 weights
    exact = forward_mode_derivative(flat_loss(model, x.float().double(), y.float().double()), w, a.float().double(),
                                    b, e)
    assert float(third @ e) == pytest.approx(exact, rel=1e-5)


def test_sharpness_gradient_equals_central_differences_of_the_top_eigenvalue():
    model, x, y = tanh_mlp(seed=2), *regression_data(20, 5, 3, seed=2)
    f, w = flat_loss(model, x, y), flat_params(model, [n for n, _ in model.named_parameters()])
    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, w, vectorize=True))
    assert eig[-1] - eig[-2] > 0.2 * eig[-1]  # well separated: S is smooth near w
    op = hessian_operator(model, mse, [(x, y)])
    top = lanczos(op, 1, tol=1e-12, max_iter=op.dim, generator=torch.Generator().manual_seed(0))
    grad_S = sharpness_gradient(op, -3.0 * top.eigenvectors[:, 0])  # any scale and sign

    def sharpness(flat):
        return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat, vectorize=True))[-1])

    h = 1e-3
    for e in vectors(2, op.dim, seed=7):
        wide = (sharpness(w + h * e) - sharpness(w - h * e)) / (2 * h)
        narrow = (sharpness(w + h / 2 * e) - sharpness(w - h / 2 * e)) / h
        assert float(grad_S @ e) == pytest.approx((4 * narrow - wide) / 3, rel=1e-7)


def test_preconditioned_sharpness_gradient_equals_central_differences_of_the_top_eigenvalue():
    model, x, y = tanh_mlp(seed=2), *regression_data(20, 5, 3, seed=2)
    f, w = flat_loss(model, x, y), flat_params(model, [n for n, _ in model.named_parameters()])
    P = 0.2 + torch.rand(w.numel(), generator=torch.Generator().manual_seed(8), dtype=DT)
    scale = torch.sqrt(torch.outer(P, P))

    def spectrum(flat):
        return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat, vectorize=True) / scale)

    eig = spectrum(w)
    assert eig[-1] - eig[-2] > 0.2 * eig[-1]
    op = hessian_operator(model, mse, [(x, y)])
    top = lanczos(preconditioned_operator(op, P), 1, tol=1e-12, max_iter=op.dim,
                  generator=torch.Generator().manual_seed(0))
    assert float(top.eigenvalues[0]) == pytest.approx(float(eig[-1]), rel=1e-10)
    grad_S = preconditioned_sharpness_gradient(op, top.eigenvectors[:, 0], P)
    h = 1e-3
    for e in vectors(2, op.dim, seed=9):
        wide = float(spectrum(w + h * e)[-1] - spectrum(w - h * e)[-1]) / (2 * h)
        narrow = float(spectrum(w + h / 2 * e)[-1] - spectrum(w - h / 2 * e)[-1]) / h
        assert float(grad_S @ e) == pytest.approx((4 * narrow - wide) / 3, rel=1e-7)
    # The plain formula with P's eigenvector would be another vector altogether.
    assert not torch.allclose(grad_S, sharpness_gradient(op, top.eigenvectors[:, 0]), rtol=0.1)
    with pytest.raises(ValueError, match="flat diagonal"):
        preconditioned_sharpness_gradient(op, top.eigenvectors[:, 0], P[:-1])


def torch_reverse_cubed(f, w, a, b) -> torch.Tensor:
    """``grad_w (a . H(w) b)`` by torch.autograd three times over, outside the operator (which refuses such models)."""
    w = w.detach().requires_grad_(True)
    g = torch.autograd.grad(f(w), w, create_graph=True)[0]
    hb = torch.autograd.grad(g @ b, w, create_graph=True)[0]
    return torch.autograd.grad(hb @ a, w)[0]


def test_torch_fused_norms_still_have_wrong_third_derivatives():
    """torch 2.13: nn.LayerNorm and BatchNorm with batch statistics give wrong D^3 L, right H.

    If this fails, torch has fixed them: the operator's refusal
    (:func:`~eos_toolkit.curvature_gradient.wrong_third_derivative_modules`)
    and the plain LayerNorm of the language model can go.
    """
    model, x, y = block_case()
    fused_norms = copy.deepcopy(model)
    for name in ("ln1", "ln2"):
        plain = getattr(model, name)
        torch_ln = nn.LayerNorm(4).to(DT)
        torch_ln.load_state_dict(plain.state_dict())
        setattr(fused_norms, name, torch_ln)
    w = flat_params(model, [n for n, _ in model.named_parameters()])
    assert torch.allclose(model(x), fused_norms(x), rtol=0, atol=1e-14)  # the same function
    a, b, e = vectors(3, w.numel(), seed=10)
    f_plain, f_torch = flat_loss(model, x, y), flat_loss(fused_norms, x, y)
    # Hessians agree ...
    hb_plain = torch.autograd.functional.vhp(f_plain, w, b)[1]
    hb_torch = torch.autograd.functional.vhp(f_torch, w, b)[1]
    assert torch.allclose(hb_torch, hb_plain, rtol=1e-10, atol=1e-12 * float(hb_plain.abs().max()))
    # ... third derivatives do not: the plain one matches central differences, torch's is off by far more.
    reference = central_difference(f_plain, w, a, b, e)
    assert float(torch_reverse_cubed(f_plain, w, a, b) @ e) == pytest.approx(reference, rel=1e-7)
    torch_error = abs(float(torch_reverse_cubed(f_torch, w, a, b) @ e) - reference) / abs(reference)
    assert torch_error > 1e-2, f"torch's LayerNorm now has right third derivatives ({torch_error:.1e})"

    # BatchNorm with batch statistics: the same flaw (running statistics are constants, and right).
    torch.manual_seed(0)
    cnn = SmallCNN().to(DT).train()
    xc, yc = torch.randn(6, 1, 6, 6, dtype=DT), torch.randn(6, 3, dtype=DT)
    wc = flat_params(cnn, [n for n, _ in cnn.named_parameters()])
    a, b, e = vectors(3, wc.numel(), seed=11)
    by_hand = central_difference(lambda flat: cnn_loss_plain(flat, cnn, xc, yc, batch_stats=True), wc, a, b, e)
    with torch.no_grad():
        buffers = {n: t.clone() for n, t in cnn.named_buffers()}

    def f_batch_stats(flat):
        state = {**split_flat(flat, cnn, [n for n, _ in cnn.named_parameters()]),
                 **{n: t.clone() for n, t in buffers.items()}}
        return mse_by_hand(functional_call(cnn, state, (xc,)), yc)

    bn_error = abs(float(torch_reverse_cubed(f_batch_stats, wc, a, b) @ e) - by_hand) / abs(by_hand)
    assert bn_error > 1e-3, f"torch's batch-statistics BatchNorm now has right third derivatives ({bn_error:.1e})"


def test_the_operator_refuses_modules_with_wrong_third_derivatives():
    model, x, y = block_case()
    model.ln2 = nn.LayerNorm(4).to(DT)
    op = hessian_operator(model, mse, [(x, y)])
    with pytest.raises(ValueError, match=r"ln2 \(torch's fused layer norm\)"):
        op.third_derivative(torch.ones(op.dim, dtype=DT))
    assert op.n_third_derivatives == 0
    cnn, xc, yc = cnn_case()
    batch_stats = hessian_operator(cnn, mse, [(xc, yc)], bn_mode="batch_stats")
    with pytest.raises(ValueError, match=r"bn \(batch normalisation with batch statistics\)"):
        batch_stats.third_derivative(torch.ones(batch_stats.dim, dtype=DT))
    assert wrong_third_derivative_modules(cnn.eval()) == []
    instance = "the model (instance normalisation with instance statistics)"
    assert wrong_third_derivative_modules(nn.InstanceNorm1d(3)) == [instance]

    class OwnForward(nn.LayerNorm):
        def forward(self, x):
            return PlainLayerNorm.forward(self, x)

    assert wrong_third_derivative_modules(nn.Sequential(OwnForward(3))) == []
    with pytest.raises(ValueError, match="shape"):
        op.third_derivative(torch.ones(op.dim + 1, dtype=DT))


# -- data over two ranks ----------------------------------------------------------------------------------

def shards(rank: int):
    x, y = regression_data(12, 5, 3)
    return [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]


def one_process_answer(seed: int = 12) -> torch.Tensor:
    """The third derivative over all the data in one process, itself checked against forward mode."""
    x, y = regression_data(12, 5, 3)
    model = tanh_mlp()
    op = hessian_operator(model, mse, [(x, y)])
    a, b = vectors(2, op.dim, seed=seed)
    expected = op.third_derivative(a, b)
    w = flat_params(model, [n for n, _ in model.named_parameters()])
    assert float(expected @ b) == pytest.approx(forward_mode_derivative(flat_loss(model, x, y), w, a, b, b), rel=1e-10)
    return expected


class ThreadPair(Collective):
    """Two threads of this process standing in for two ranks: ``all_reduce`` sums (or takes the maximum of)
    what both pass, as ``torch.distributed.all_reduce`` does over a process group of two."""

    def __init__(self, process_group, device):
        super().__init__(process_group, device)
        self.rank, self.slots, self.barrier = process_group

    def all_reduce(self, tensor, op=None):
        self.slots[self.rank] = tensor.clone()
        self.barrier.wait()
        both = torch.stack(self.slots)
        reduced = both.amax(0) if op == torch.distributed.ReduceOp.MAX else both[0] + both[1]
        self.barrier.wait()  # both have read the slots before either writes again
        return tensor.copy_(reduced)


def test_two_ranks_in_threads_give_the_one_process_answer(monkeypatch):
    """The operator's collectives over two ranks, the ranks being threads (a fast stand-in for the gloo test)."""
    monkeypatch.setattr(eos_toolkit.hvp, "Collective", ThreadPair)
    slots, barrier, found = [None, None], threading.Barrier(2, timeout=60), {}

    def rank_main(rank):
        try:
            op = hessian_operator(tanh_mlp(), mse, shards(rank), process_group=(rank, slots, barrier),
                                  debug_replicated=True)
            a, b = vectors(2, op.dim, seed=12)
            found[rank] = op.third_derivative(a, b)
        except Exception as err:  # noqa: BLE001 (re-raised below, in the test)
            barrier.abort()
            found[rank] = err

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    expected = one_process_answer()
    for rank in range(2):
        if isinstance(found[rank], Exception):
            raise found[rank]
        assert torch.allclose(found[rank], expected, rtol=1e-12, atol=1e-13 * float(expected.abs().max()))
    alone = hessian_operator(tanh_mlp(), mse, shards(0)).third_derivative(*vectors(2, expected.numel(), seed=12))
    assert not torch.allclose(alone, expected, rtol=1e-3)  # one rank's data alone is another answer


def third_on_shards(rank: int, world_size: int, out_dir) -> None:
    op = hessian_operator(tanh_mlp(), mse, shards(rank), process_group=torch.distributed.group.WORLD,
                          debug_replicated=True)
    a, b = vectors(2, op.dim, seed=12)
    torch.save(op.third_derivative(a, b), out_dir / f"rank{rank}.pt")
    # The operator is held in a reference cycle (its kernel fallback's callback); left to the interpreter's
    # exit, the process group it holds is destroyed there and the rank can abort ("terminate called without
    # an active exception": 1 run in 5 to 1 in 20 here, torch 2.13).  Free it first.
    del op
    gc.collect()


@needs_gloo
@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_answer(tmp_path):
    """Each rank holds part of the data; the weights are global and the result all-reduced (float64:
    only the order of additions differs).  Two spawned processes importing torch: seconds, so ``-m slow``."""
    spawn_ranks(third_on_shards, tmp_path, tmp_path)
    expected = one_process_answer()
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(found, expected, rtol=1e-12, atol=1e-13 * float(expected.abs().max()))
