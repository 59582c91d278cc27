"""Eigensolvers and spectral estimators against torch.linalg.eigvalsh of dense matrices."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from eos_toolkit import solvers
from eos_toolkit.hvp import hessian_operator
from eos_toolkit.operators import FunctionOperator, MatrixOperator
from eos_toolkit.solvers import (
    block_lanczos,
    eigenvalue_error_bound,
    gaussian_density,
    hutchinson_trace,
    KrylovWorkspace,
    lanczos,
    power_iteration,
    slq_density,
)
from tests.eos_toolkit.reference import DT, dense_hessian, regression_data, spectrum_matrix, tanh_mlp

mse = nn.functional.mse_loss


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mlp_hessian():
    model = tanh_mlp(sizes=(5, 8, 6, 3))
    x, y = regression_data(20, 5, 3)
    op = hessian_operator(model, mse, [(x[:7], y[:7]), (x[7:], y[7:])])
    H = dense_hessian(model, mse, x, y)
    return op, H, torch.linalg.eigvalsh(H).flip(0)


@pytest.fixture(params=["host", "accelerator"])
def path(request, monkeypatch):
    """Run a test on both of the solvers' code paths: scalars on the host (read freely, the CPU's) and the
    accelerator's (no host reads in a step: the second pass always, restart vectors always drawn)."""
    if request.param == "accelerator":
        monkeypatch.setattr(solvers, "_on_host", lambda device: False)
    return request.param


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("k", [1, 5])
def test_lanczos_top_k_of_a_model_hessian(mlp_hessian, k, path):
    op, H, exact = mlp_hessian
    res = lanczos(op, k, max_iter=op.dim, tol=1e-10, generator=gen())
    assert res.converged
    assert relative_error(res.eigenvalues, exact[:k]) <= 1e-8
    Y = res.eigenvectors
    assert (Y.T @ Y - torch.eye(k, dtype=DT)).abs().max() <= 1e-8
    true_residuals = (H @ Y - Y * res.eigenvalues).norm(dim=0)
    assert torch.allclose(true_residuals, res.residuals, atol=1e-9 * exact[0])


def known_spectrum(n: int = 120) -> torch.Tensor:
    """Top pair 1e-7 apart (relative), the largest magnitudes negative."""
    ev = torch.linspace(-3.0, 8.0, n, dtype=DT)
    ev[-1], ev[-2] = 10.0, 10.0 - 1e-6
    ev[0], ev[1] = -40.0, -25.0
    return ev


@pytest.mark.parametrize("k", [1, 5])
def test_lanczos_largest_algebraic_with_near_degenerate_top_pair(k):
    ev = known_spectrum()
    A, _ = spectrum_matrix(ev)
    res = lanczos(MatrixOperator(A), k, max_iter=A.shape[0], tol=1e-10, generator=gen())
    top = ev.sort(descending=True).values[:k]
    assert relative_error(res.eigenvalues, top) <= 1e-8
    smallest = lanczos(MatrixOperator(A), 2, which="smallest", max_iter=A.shape[0],
                       tol=1e-10, generator=gen())
    assert relative_error(smallest.eigenvalues, torch.tensor([-40.0, -25.0], dtype=DT)) <= 1e-8


def test_warm_start_from_true_top_vector_converges_in_three_products(mlp_hessian):
    op, H, exact = mlp_hessian
    top_vector = torch.linalg.eigh(H).eigenvectors[:, -1]
    res = lanczos(op, 1, tol=1e-8, v0=top_vector, generator=gen())
    assert res.converged and res.n_matvecs <= 3
    assert relative_error(res.eigenvalues, exact[:1]) <= 1e-8
    A, Q = spectrum_matrix(known_spectrum())
    res = lanczos(MatrixOperator(A), 1, tol=1e-8, v0=Q[:, -1], generator=gen())
    assert res.n_matvecs <= 3 and abs(float(res.eigenvalues[0]) - 10.0) <= 1e-7


def test_warm_start_block_of_eigenvectors_finds_all_of_them():
    ev = torch.linspace(-1.0, 1.0, 80, dtype=DT)
    ev[-3:] = torch.tensor([3.0, 4.0, 5.0], dtype=DT)
    A, Q = spectrum_matrix(ev)
    res = lanczos(MatrixOperator(A), 3, tol=1e-8, v0=Q[:, -3:], generator=gen())
    assert res.n_matvecs <= 3 + 1
    assert relative_error(res.eigenvalues, torch.tensor([5.0, 4.0, 3.0], dtype=DT)) <= 1e-8


class NeverAgrees(MatrixOperator):
    """A matrix whose processes never agree to stop: a solve runs to max_iter."""

    def agree(self, flag: bool) -> bool:
        return False


def test_long_runs_show_no_ghost_copies_and_keep_an_orthonormal_basis(path):
    """60 steps past convergence of an isolated top eigenvalue: without (enough) reorthogonalisation
    copies of 10.0 reappear among the Ritz values; the top five must be the five distinct eigenvalues."""
    ev = torch.linspace(-1.0, 1.0, 300, dtype=DT)
    ev[-5:] = torch.tensor([2.0, 3.0, 4.0, 6.0, 10.0], dtype=DT)
    A, _ = spectrum_matrix(ev)
    # Never agree to stop: all 90 steps, far past the convergence of 10.0 (tol=0 alone would stop wherever
    # the tridiagonal solver rounds a residual to exactly 0, which moves with the thread count).
    res = lanczos(NeverAgrees(A), 5, max_iter=90, tol=0.0, generator=gen())
    assert res.n_matvecs == 90
    assert relative_error(res.eigenvalues, torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0], dtype=DT)) <= 1e-10
    Y = res.eigenvectors
    assert (Y.T @ Y - torch.eye(5, dtype=DT)).abs().max() <= 1e-10


@pytest.mark.parametrize("k", [1, 3])
def test_a_spectrum_far_from_zero_keeps_the_basis_orthogonal(k, path):
    """|alpha_j| >> beta_j at every step: one Gram-Schmidt pass compounds the basis's error by
    |A q| / |w| a step, and the Ritz values leave the spectrum (660 for a top eigenvalue of 101)."""
    ev = 100.0 + torch.linspace(0.0, 1.0, 200, dtype=DT)
    ev[-3:] = torch.tensor([101.01, 101.03, 101.05], dtype=DT)
    A, _ = spectrum_matrix(ev)
    res = lanczos(MatrixOperator(A), k, tol=1e-8, max_iter=200, generator=gen())
    assert res.converged
    assert relative_error(res.eigenvalues, ev.sort(descending=True).values[:k]) <= 1e-10
    Y = res.eigenvectors
    assert (Y.T @ Y - torch.eye(k, dtype=DT)).abs().max() <= 1e-10


def test_equal_ritz_values_converge_under_the_eigenvalue_rule():
    """A zero gap gives no second-order bound (r^2 / 0); the rule falls back to the residual."""
    A = 2.0 * torch.eye(10, dtype=DT)
    res = lanczos(MatrixOperator(A), 2, tol=1e-8, criterion="eigenvalue", generator=gen())
    assert res.converged and res.n_matvecs < 10
    assert torch.allclose(res.eigenvalues, torch.full((2,), 2.0, dtype=DT))
    assert torch.equal(eigenvalue_error_bound(torch.tensor([0.0, 1e-3]), torch.tensor([0.0, 0.0])),
                       torch.tensor([0.0, 1e-3]))


def test_non_finite_products_are_named(path):
    with pytest.raises(ValueError, match="non-finite values"):
        lanczos(FunctionOperator(lambda v: v * float("nan"), 20), 1, generator=gen())
    # A float32 product whose norm overflows is not an invariant subspace.
    big = torch.full((20,), 1e19)
    with pytest.raises(ValueError, match="non-finite values"):
        lanczos(FunctionOperator(lambda v: big * v.sum().sign(), 20, dtype=torch.float32), 1, generator=gen())


def test_a_zero_start_vector_falls_back_to_a_random_one():
    A, Q = spectrum_matrix(known_spectrum())
    res = lanczos(MatrixOperator(A), 1, tol=1e-8, v0=torch.zeros(A.shape[0], dtype=DT), generator=gen())
    assert res.converged and abs(float(res.eigenvalues[0]) - 10.0) <= 1e-6


def test_an_invariant_subspace_restarts_from_a_fresh_vector(path):
    """Two distinct eigenvalues: one start vector's Krylov space is 2-dimensional, so three Ritz
    pairs exist only if the solver goes on (coupling 0) from a fresh vector, whose own Krylov space
    holds a second copy of the triple eigenvalue 5. (Which copies a single vector finds before every
    residual is 0 is luck: for clusters use block_lanczos.)"""
    ev = torch.ones(40, dtype=DT)
    ev[:3] = 5.0
    A, _ = spectrum_matrix(ev)
    res = lanczos(MatrixOperator(A), 3, max_iter=30, tol=1e-8, generator=gen())
    assert res.converged and res.n_matvecs == 4  # two vectors per invariant subspace
    assert relative_error(res.eigenvalues, torch.tensor([5.0, 5.0, 1.0], dtype=DT)) <= 1e-10
    Y = res.eigenvectors
    assert (A @ Y - Y * res.eigenvalues).norm(dim=0).max() <= 1e-8
    assert (Y.T @ Y - torch.eye(3, dtype=DT)).abs().max() <= 1e-10


def test_an_invariant_subspace_is_seen_where_alpha_vanishes(path):
    """A start in the span of eigenvectors with eigenvalues +-1, +-2 makes alpha_j ~ 0: |A q_j| is then
    mostly beta_{j-1}, and a dead-vector test that forgets it continues from rounding noise inside the
    invariant block and never sees the top eigenvalue 10 (it reported [2, 1, 0.5, 0.3, 0.1] as converged)."""
    R, _ = torch.linalg.qr(torch.randn(10, 10, dtype=DT, generator=gen(0)))
    A = torch.zeros(40, 40, dtype=DT)
    A[:10, :10] = (R * torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, 0.3, 0.1, -0.1, -0.3, -0.5], dtype=DT)) @ R.T
    A[10:, 10:] = torch.diag(torch.cat([torch.tensor([10.0], dtype=DT), torch.linspace(-0.4, 0.4, 29, dtype=DT)]))
    v0 = torch.zeros(40, dtype=DT)
    v0[:10] = R[:, :4].sum(1)
    res = lanczos(MatrixOperator(A), 5, max_iter=40, tol=1e-6, v0=v0, generator=gen(1))
    assert res.converged
    assert relative_error(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:5]) <= 1e-8


def test_a_workspace_is_reused_across_solves_and_changes_nothing(mlp_hessian):
    op, _, exact = mlp_hessian
    workspace = KrylovWorkspace()
    first = lanczos(op, 2, tol=1e-10, max_iter=40, generator=gen(), workspace=workspace)
    buffer = workspace._buffer
    assert first.n_matvecs + 1 <= buffer.shape[0] < 2 * (first.n_matvecs + 1)  # grown as needed, not to max_iter
    again = lanczos(op, 2, tol=1e-10, max_iter=40, generator=gen(), workspace=workspace)
    alone = lanczos(op, 2, tol=1e-10, max_iter=40, generator=gen())
    assert workspace._buffer is buffer  # not reallocated
    for res in (again, alone):
        assert torch.equal(res.eigenvalues, first.eigenvalues) and res.n_matvecs == first.n_matvecs
    assert relative_error(first.eigenvalues, exact[:2]) <= 1e-8
    assert first.eigenvectors.data_ptr() != buffer.data_ptr()  # results never alias the workspace


def test_block_lanczos_resolves_an_exact_cluster(path):
    ev = torch.linspace(-2.0, 1.0, 150, dtype=DT)
    ev[-3:] = 2.0  # triple eigenvalue: in exact arithmetic one start vector sees one copy
    A, _ = spectrum_matrix(ev)
    res = block_lanczos(MatrixOperator(A), 3, block_size=3, max_iter=120, tol=1e-8,
                        generator=gen())
    assert res.converged and res.n_matvecs < 150
    assert relative_error(res.eigenvalues, torch.full((3,), 2.0, dtype=DT)) <= 1e-8
    Y = res.eigenvectors
    assert (Y.T @ Y - torch.eye(3, dtype=DT)).abs().max() <= 1e-8
    assert (A @ Y - 2.0 * Y).norm(dim=0).max() <= 1e-7


def test_power_iteration_finds_largest_magnitude():
    ev = torch.linspace(-1.0, 1.0, 50, dtype=DT)
    ev[-1] = 3.0
    A, _ = spectrum_matrix(ev)
    res = power_iteration(MatrixOperator(A), max_iter=500, tol=1e-12, generator=gen())
    assert res.converged and abs(float(res.eigenvalues[0]) - 3.0) <= 1e-8
    negative, _ = spectrum_matrix(-ev)
    res = power_iteration(MatrixOperator(negative), max_iter=500, tol=1e-12, generator=gen())
    assert abs(float(res.eigenvalues[0]) + 3.0) <= 1e-8  # magnitude, not algebraic order


def test_hutchinson_within_three_standard_errors(mlp_hessian):
    _, H, _ = mlp_hessian
    estimate, stderr = hutchinson_trace(MatrixOperator(H), n_samples=60, generator=gen(3))
    assert stderr > 0
    assert abs(float(estimate - torch.trace(H))) <= 3 * float(stderr)


def test_slq_density_mass_and_moments(mlp_hessian):
    _, H, _ = mlp_hessian
    n = H.shape[0]
    density = slq_density(MatrixOperator(H), n_probes=30, n_steps=20, generator=gen(5))
    assert torch.allclose(density.weights.sum(dim=1), torch.ones(30, dtype=DT), atol=1e-12)
    for p, exact in [(1, torch.trace(H) / n), (2, torch.trace(H @ H) / n)]:
        per_probe = density.per_probe_moments(p)
        stderr = per_probe.std() / 30 ** 0.5
        assert abs(float(density.moment(p) - exact)) <= 3 * float(stderr)
    grid = torch.linspace(float(density.nodes.min()) - 2, float(density.nodes.max()) + 2, 4001, dtype=DT)
    values = gaussian_density(density, grid, sigma=0.05)
    assert abs(float(torch.trapezoid(values, grid)) - 1.0) <= 1e-6


def test_bad_arguments_raise_value_errors():
    A = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="k must"):
        lanczos(MatrixOperator(A), 5)
    with pytest.raises(ValueError, match="which"):
        lanczos(MatrixOperator(A), 1, which="magnitude")
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_trace(MatrixOperator(A), n_samples=1)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_density(slq_density(MatrixOperator(A), n_probes=2, n_steps=2), torch.zeros(3), 0.0)


def test_eigenvalue_rule_is_cheaper_and_still_accurate():
    ev = torch.linspace(-1.0, 1.0, 300, dtype=DT)
    ev[-1] = 1.5
    A, _ = spectrum_matrix(ev)
    by_residual = lanczos(MatrixOperator(A), 1, tol=1e-6, generator=gen())
    by_eigenvalue = lanczos(MatrixOperator(A), 1, tol=1e-6, criterion="eigenvalue", generator=gen())
    assert by_eigenvalue.converged and by_eigenvalue.n_matvecs < by_residual.n_matvecs
    assert abs(float(by_eigenvalue.eigenvalues[0]) - 1.5) <= 1e-6 * 1.5


def test_eigenvalue_error_bound_holds_with_the_true_gap():
    ev = torch.linspace(0.0, 1.0, 40, dtype=DT)
    ev[-1] = 2.0
    A, Q = spectrum_matrix(ev)
    for scale in (1e-1, 1e-2, 1e-3):
        y = Q[:, -1] + scale * torch.randn(40, generator=gen(), dtype=DT)
        y = y / y.norm()
        theta = y @ A @ y
        r = (A @ y - theta * y).norm()
        bound = eigenvalue_error_bound(r.reshape(1), (theta - 1.0).reshape(1))
        assert abs(float(theta) - 2.0) <= float(bound[0])
