"""Sharpness tracker and stability thresholds: quadratics with closed forms, dense Hessians, live optimizers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eos_toolkit.hvp import NondeterministicOperatorError
from eos_toolkit.thresholds import adam_threshold, gd_threshold, momentum_threshold
from eos_toolkit.operators import MatrixOperator
from eos_toolkit.solvers import power_iteration
from eos_toolkit.tracker import SharpnessTracker
from tests.eos_toolkit.reference import DT, SmallCNN, dense_hessian, regression_data, spectrum_matrix, tanh_mlp

mse = nn.functional.mse_loss


class Quadratic(nn.Module):
    """``x`` as the model output; the loss ``0.5 x^T A x`` ignores the data."""

    def __init__(self, dim: int):
        super().__init__()
        self.x = nn.Parameter(torch.ones(dim, dtype=DT))

    def forward(self, inputs):
        return self.x


def quadratic_loss(A: torch.Tensor):
    return lambda x, targets: 0.5 * x @ A @ x


def test_thresholds_closed_forms():
    assert gd_threshold(0.05) == pytest.approx(40.0)
    assert momentum_threshold(0.1, 0.0) == pytest.approx(gd_threshold(0.1))
    assert momentum_threshold(0.01, 0.5) == pytest.approx(2 * 1.5 / (0.5 * 0.01))
    assert adam_threshold(1e-3, 0.9) == pytest.approx(38 / 1e-3)
    rate = torch.tensor(0.02, dtype=DT)
    assert torch.is_tensor(adam_threshold(rate, 0.9))
    assert float(adam_threshold(rate, 0.9)) == pytest.approx(1900.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="lr"):
            gd_threshold(bad)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="beta1"):
            adam_threshold(0.1, bad)


def test_quadratic_sharpness_and_the_stability_edge():
    A, _ = spectrum_matrix(torch.tensor([0.5, 1.0, 3.0, 7.5], dtype=DT))
    model = Quadratic(4)
    data = [(torch.zeros(1), torch.zeros(1))]
    sharpness = SharpnessTracker(model, quadratic_loss(A), data, tol=1e-10).measure()["sharpness"]
    assert sharpness == pytest.approx(7.5, rel=1e-10)
    start_norm = float(model.x.detach().norm())

    def norm_after_sgd(lr: float, steps: int = 1000) -> float:
        model.x.data.fill_(1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            quadratic_loss(A)(model(None), None).backward()
            optimizer.step()
        return float(model.x.detach().norm())

    edge = 2 / 7.5
    assert gd_threshold(edge * 0.99) > sharpness and norm_after_sgd(edge * 0.99) < 1e-3 * start_norm
    assert gd_threshold(edge * 1.01) < sharpness and norm_after_sgd(edge * 1.01) > 1e3 * start_norm


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_ema_momentum_edge_matches_momentum_threshold(beta1):
    """m <- beta1 m + (1 - beta1) A x; x <- x - lr m on a 1-D quadratic with curvature lam."""
    lam = 4.0

    def final_size(lr: float, steps: int = 4000) -> float:
        x, m = 1.0, 0.0
        for _ in range(steps):
            m = beta1 * m + (1 - beta1) * lam * x
            x = x - lr * m
            if abs(x) > 1e6:
                break  # diverged
        return abs(x)

    edge = 2 * (1 + beta1) / ((1 - beta1) * lam)  # the rate at which momentum_threshold(lr) == lam
    assert momentum_threshold(edge, beta1) == pytest.approx(lam)
    assert final_size(edge * 0.98) < 1e-3
    assert final_size(edge * 1.02) > 1e3


def test_tracker_metrics_warm_start_and_top_eigenvector():
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    tracker = SharpnessTracker(model, mse, [(x[:6], y[:6]), (x[6:], y[6:])], k=3, tol=1e-6)
    first = tracker.measure()
    exact = torch.linalg.eigvalsh(dense_hessian(model, mse, x, y)).flip(0)
    expected_keys = {"sharpness", "hessian_matvecs", "hessian_seconds", "hessian_converged"}
    expected_keys |= {f"hessian_{kind}_{i}" for kind in ("eig", "residual") for i in (1, 2, 3)}
    assert set(first) == expected_keys
    assert all(type(v) is float for v in first.values())
    assert first["sharpness"] == first["hessian_eig_1"]
    for i in range(3):
        assert first[f"hessian_eig_{i + 1}"] == pytest.approx(float(exact[i]), rel=1e-6)
    top = tracker.top_eigenvector
    assert [t.shape for t in top] == [p.shape for p in model.parameters()]
    # One small gradient step, then the warm start needs only a few products.
    with torch.no_grad():
        model.zero_grad()
    mse(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    second = tracker.measure()
    assert second["hessian_matvecs"] < first["hessian_matvecs"]
    flat = tracker.top_eigenvector_flat
    assert float(flat @ tracker.hessian.flatten(top)) > 0  # signs aligned across measurements


def test_tracker_preconditioned_metrics_with_adam():
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(model, mse, [(x, y)], k=2, precondition=True, tol=1e-8)
    before = tracker.measure(None)  # no preconditioner yet (an optimizer before its first step): NaN, not absent
    assert math.isnan(before["precond_sharpness"]) and math.isnan(before["precond_eig_2"])
    for _ in range(3):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = (1 - 0.9 ** 3) * (torch.sqrt(v / (1 - 0.999 ** 3)) + 1e-8)
    metrics = tracker.measure(P)
    H = dense_hessian(model, mse, x, y)
    exact = torch.linalg.eigvalsh(H / torch.sqrt(torch.outer(P, P))).flip(0)
    assert metrics["precond_sharpness"] == pytest.approx(float(exact[0]), rel=1e-7)
    assert metrics["precond_eig_2"] == pytest.approx(float(exact[1]), rel=1e-7)
    assert {"precond_matvecs", "precond_seconds", "precond_residual_1"} <= set(metrics)


def test_tracker_probe_fires_on_dropout_and_batchnorm_statistics_survive():
    """With the default hvp method, auto: the reference's two products of one vector disagree, and the error says why."""
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT).train()
    x, y = regression_data(16, 5, 3)
    tracker = SharpnessTracker(noisy, mse, [(x, y)], dropout="as_is")
    with pytest.raises(NondeterministicOperatorError):
        tracker.measure()
    # named after the reference's two products of one vector, before any other method is timed
    assert tracker.hessian.n_matvecs == 2
    SharpnessTracker(noisy, mse, [(x, y)]).measure()  # dropout off by policy
    assert noisy.training

    cnn = SmallCNN().to(DT).train()
    images = torch.randn(8, 1, 6, 6, dtype=DT)
    targets = torch.randn(8, 3, dtype=DT)
    cnn(images)
    saved = {n: b.clone() for n, b in cnn.named_buffers()}
    for bn_mode, solver, k in (("eval", "lanczos", 2), ("batch_stats", "block_lanczos", 2),
                               ("batch_stats", "power", 1)):
        tracker = SharpnessTracker(cnn, mse, [(images[:5], targets[:5]), (images[5:], targets[5:])],
                                   k=k, bn_mode=bn_mode, solver=solver, max_iter=12)
        tracker.measure()
        tracker.measure()
    assert all(torch.equal(b, saved[n]) for n, b in cnn.named_buffers())
    assert cnn.training


def test_tracker_rejects_bad_arguments():
    model = tanh_mlp()
    x, y = regression_data(4, 5, 3)
    with pytest.raises(ValueError, match="solver"):
        SharpnessTracker(model, mse, [(x, y)], solver="arpack")
    with pytest.raises(ValueError, match="power"):
        SharpnessTracker(model, mse, [(x, y)], solver="power", k=2)


@pytest.mark.gpu
def test_tracker_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    cpu = SharpnessTracker(model, mse, [(x, y)], k=2, tol=1e-8).measure()
    gpu = SharpnessTracker(model.cuda(), mse, [(x, y)], k=2, tol=1e-8).measure()
    assert gpu["hessian_eig_1"] == pytest.approx(cpu["hessian_eig_1"], rel=1e-7)
    assert gpu["hessian_eig_2"] == pytest.approx(cpu["hessian_eig_2"], rel=1e-7)


def test_state_dict_round_trip_resumes_identically():
    import io

    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    first = SharpnessTracker(model, mse, [(x, y)], k=2)
    first.measure()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = SharpnessTracker(model, mse, [(x, y)], k=2)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert first.measure()["hessian_eig_1"] == second.measure()["hessian_eig_1"]
    assert torch.equal(first.eigenvectors, second.eigenvectors)


def test_matvec_counts_include_the_determinism_probe():
    """Every product a measurement used is counted: the probe's two, then only the solves'."""
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    start = torch.randn(sum(p.numel() for p in model.parameters()), 1, dtype=DT)
    counts = []
    for probe in (True, False):  # the same warm start, so the solves take the same products
        tracker = SharpnessTracker(model, mse, [(x, y)], tol=1e-8, determinism_probe=probe, method="double_backward")
        tracker.eigenvectors = start / start.norm()
        counts.append(tracker.measure()["hessian_matvecs"])
    assert counts[0] == counts[1] + 2
    tracker = SharpnessTracker(model, mse, [(x, y)], precondition=True, tol=1e-8)
    P = torch.rand(tracker.hessian.dim, dtype=DT) + 0.5
    first = tracker.measure(P)
    assert first["hessian_matvecs"] + first["precond_matvecs"] == tracker.hessian.n_matvecs
    counted = tracker.hessian.n_matvecs
    second = tracker.measure(P)  # no probe the second time
    assert second["hessian_matvecs"] + second["precond_matvecs"] == tracker.hessian.n_matvecs - counted


def test_auto_method_is_chosen_once_counted_and_kept_by_a_resumed_tracker():
    from eos_toolkit.settings import METHODS

    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    auto = SharpnessTracker(model, mse, [(x[:9], y[:9]), (x[9:], y[9:])], k=2, tol=1e-9)
    first = auto.measure()
    chosen = auto.method_choice["method"]
    assert auto.hessian.method == chosen and set(auto.method_choice["timings"]) == set(METHODS)
    fixed = SharpnessTracker(model, mse, [(x[:9], y[:9]), (x[9:], y[9:])], k=2, tol=1e-9, method=chosen)
    alone = fixed.measure()
    # The choice times the methods on a vector of its own before the solve: five products in float64 (two of
    # forward-over-reverse, two of reuse_graph, one of finite differences), counted; they answer the
    # determinism probe (whose two products the fixed-method tracker pays). The solve is then the
    # fixed-method tracker's own: the same random stream, the same rule from its first product.
    assert first["hessian_matvecs"] == alone["hessian_matvecs"] + 5 - 2
    assert first["hessian_eig_1"] == alone["hessian_eig_1"] and first["hessian_eig_2"] == alone["hessian_eig_2"]
    assert auto.measure()["hessian_matvecs"] == fixed.measure()["hessian_matvecs"]  # chosen once
    resumed = SharpnessTracker(model, mse, [(x[:9], y[:9]), (x[9:], y[9:])], k=2, tol=1e-9)
    resumed.load_state_dict(auto.state_dict())
    assert resumed.hessian.method == chosen and resumed.method_choice == auto.method_choice
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        SharpnessTracker(model, mse, [(x, y)], method="fast")



def test_a_two_parameter_solve_counts_the_choice_and_finds_the_dense_sharpness():
    """Lanczos stops after two products on two parameters; the choice's five come before them."""
    A, _ = spectrum_matrix(torch.tensor([3.0, -1.0], dtype=DT))
    model = Quadratic(2)
    tracker = SharpnessTracker(model, quadratic_loss(A), [(torch.zeros(1), torch.zeros(1))], tol=1e-10)
    first = tracker.measure()
    timings = tracker.method_choice["timings"]
    assert set(timings) == {"forward_over_reverse", "reuse_graph", "double_backward", "finite_difference"}
    assert first["hessian_matvecs"] == 5 + 2 == tracker.hessian.n_matvecs
    assert first["sharpness"] == pytest.approx(3.0, rel=1e-10)
    assert tracker.hessian.method == tracker.method_choice["method"]


def test_auto_with_blocks_times_every_method_on_blocks_of_the_solves_width(monkeypatch):
    """block_lanczos with k=2 on four parameters: the choice times every method on blocks of the solve's
    width, so no method is timed on fewer columns than it will be asked for."""
    from eos_toolkit.hvp import HessianOperator

    widths = []
    real = HessianOperator.__matmul__
    monkeypatch.setattr(HessianOperator, "__matmul__", lambda op, v: widths.append(tuple(v.shape)) or real(op, v))
    A, _ = spectrum_matrix(torch.tensor([3.0, 2.0, -1.0, 0.5], dtype=DT))
    tracker = SharpnessTracker(Quadratic(4), quadratic_loss(A), [(torch.zeros(1), torch.zeros(1))], k=2,
                               solver="block_lanczos", tol=1e-10)
    metrics = tracker.measure()
    # the choice's five blocks (its products go through op @ x); the solve calls matmat directly
    assert widths == [(4, 2)] * 5 and metrics["hessian_matvecs"] == 5 * 2 + 2 * 2
    assert [metrics["hessian_eig_1"], metrics["hessian_eig_2"]] == pytest.approx([3.0, 2.0], rel=1e-10)


def test_a_model_no_method_can_differentiate_twice_is_named_with_every_reason(monkeypatch):
    from eos_toolkit.hvp import HessianOperator
    from eos_toolkit.modes import MissingSecondDerivativeError
    from eos_toolkit.settings import METHODS

    def fails(self, block):
        raise RuntimeError("no derivative here")

    for name in METHODS:
        monkeypatch.setattr(HessianOperator, f"_{name}", fails)
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    with pytest.raises(MissingSecondDerivativeError, match="no Hessian-vector product method works") as caught:
        SharpnessTracker(model, mse, [(x, y)]).measure()
    assert all(f"{name}: RuntimeError: no derivative here" in str(caught.value) for name in METHODS)


def test_power_solver_reports_lambda_max_on_an_indefinite_hessian():
    """Power iteration alone finds -86.8 (largest magnitude); the tracker's sharpness must be lambda_max = 5.3."""
    eigenvalues = torch.tensor([-86.8, 5.3, 2.0, -1.0, 0.5], dtype=DT)
    A, _ = spectrum_matrix(eigenvalues)
    model = Quadratic(5)
    data = [(torch.zeros(1), torch.zeros(1))]
    metrics = SharpnessTracker(model, quadratic_loss(A), data, solver="power", tol=1e-10,
                               max_iter=3000).measure()
    assert metrics["sharpness"] == pytest.approx(5.3, rel=1e-6)
    assert metrics["hessian_residual_1"] < 1e-2  # the eigenvector converges as the square root of the value


def test_power_iteration_which():
    A, _ = spectrum_matrix(torch.tensor([-86.8, 5.3, 2.0, -1.0, 0.5], dtype=DT))
    g = torch.Generator().manual_seed(0)
    magnitude = power_iteration(MatrixOperator(A), tol=1e-12, max_iter=3000, generator=g)
    largest = power_iteration(MatrixOperator(A), tol=1e-12, max_iter=3000, generator=g, which="LA")
    assert float(magnitude.eigenvalues[0]) == pytest.approx(-86.8, rel=1e-9)
    assert float(largest.eigenvalues[0]) == pytest.approx(5.3, rel=1e-9)
    assert largest.n_matvecs > magnitude.n_matvecs  # both runs counted
    positive, _ = spectrum_matrix(torch.tensor([3.0, 1.0, -2.0], dtype=DT))
    assert float(power_iteration(MatrixOperator(positive), tol=1e-12, max_iter=3000, generator=g,
                                 which="LA").eigenvalues[0]) == pytest.approx(3.0, rel=1e-9)
    with pytest.raises(ValueError, match="which must be"):
        power_iteration(MatrixOperator(A), which="SA")


def test_power_iteration_does_not_claim_a_wrong_lambda_max_on_a_clustered_spectrum():
    """Top eigenvalues 5.3, 5.0, 4.5 under a dominant -86.8: the shifted ratio is 0.997, convergence is slow.

    A stopping rule on the change of the estimate reported 1.95 as converged here; the residual rule
    either gets 5.3 right or says it did not converge.
    """
    rest = torch.linspace(-5.0, 4.0, 196, dtype=DT)
    A, _ = spectrum_matrix(torch.cat([torch.tensor([-86.8, 5.3, 5.0, 4.5], dtype=DT), rest]))
    g = torch.Generator().manual_seed(0)
    short = power_iteration(MatrixOperator(A), tol=1e-3, max_iter=60, generator=g, which="LA")
    assert short.n_matvecs <= 60 + 2
    assert not short.converged or abs(float(short.eigenvalues[0]) / 5.3 - 1) < 1e-3
    long = power_iteration(MatrixOperator(A), tol=1e-3, max_iter=20000, generator=g, which="LA")
    assert long.converged and abs(float(long.eigenvalues[0]) / 5.3 - 1) < 1e-3


def test_the_choice_answers_the_probe_and_names_a_random_operator(monkeypatch):
    """With "auto" the determinism probe costs nothing more: the reference's own two products of one vector
    answer it (forward-over-reverse, or reuse_graph with its graphs dropped between them)."""
    from eos_toolkit.hvp import HessianOperator

    calls = []
    real = HessianOperator.check_determinism
    monkeypatch.setattr(HessianOperator, "check_determinism", lambda op, **kw: calls.append(1) or real(op, **kw))
    model = tanh_mlp(sizes=(5, 8, 3))
    x, y = regression_data(16, 5, 3)
    SharpnessTracker(model, mse, [(x, y)], k=1, tol=1e-9).measure()
    assert calls == []
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    with pytest.raises(NondeterministicOperatorError, match="dropout"):
        SharpnessTracker(noisy, mse, [(x, y)], dropout="as_is").measure()
