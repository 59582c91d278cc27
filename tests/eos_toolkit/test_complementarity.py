"""The small complementarity problem of the central flow, against closed forms and its own definition."""

import numpy as np
import pytest

from eos_toolkit.complementarity import ComplementarityError, sdcp_violation, solve_sdcp


def _symmetric(rng, k):
    A = rng.normal(size=(k, k))
    return (A + A.T) / 2


def _identity(k, scale=1.0):
    """B[X] = scale X as a (k, k, k, k) tensor."""
    return scale * np.einsum("ip,jq->ijpq", np.eye(k), np.eye(k))


def test_one_dimensional_problem_is_closed_form():
    B = np.full((1, 1, 1, 1), 4.0)
    assert solve_sdcp(np.array([[-2.0]]), B)[0, 0] == pytest.approx(0.5, rel=1e-12)  # -a / b
    assert solve_sdcp(np.array([[3.0]]), B)[0, 0] == 0.0  # a margin left: no oscillation


@pytest.mark.parametrize("k", [2, 3, 4])
def test_identity_operator_gives_the_psd_part_of_minus_a(k):
    # min 1/2 c |X|^2 + <A, X> over X >= 0 is the projection of -A / c onto the PSD cone.
    rng = np.random.default_rng(k)
    for _ in range(5):
        A = _symmetric(rng, k)
        w, V = np.linalg.eigh(-A)
        expected = (V * np.maximum(w, 0)) @ V.T / 3.0
        np.testing.assert_allclose(solve_sdcp(A, _identity(k, 3.0)), expected, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3])
def test_gram_operators_meet_the_three_conditions(k):
    # The flow's B: a Gram matrix of third-derivative vectors, scaled over six orders of magnitude.
    rng = np.random.default_rng(10 + k)
    for trial in range(20):
        T = rng.normal(size=(k, k, 12))
        T = (T + T.transpose(1, 0, 2)) / 2
        B = np.einsum("ijn,pqn->ijpq", T, T) * 10.0 ** rng.uniform(-3, 3)
        A = _symmetric(rng, k)
        X = solve_sdcp(A, B)
        R = A + np.einsum("ijpq,pq->ij", B, X)
        scale = np.abs(A).max() + np.abs(B).max() * max(np.abs(X).max(), 1e-300)
        assert np.linalg.eigvalsh(X).min() >= -1e-8 * max(np.abs(X).max(), 1e-300)
        assert np.linalg.eigvalsh(R).min() >= -1e-8 * scale
        assert abs(np.sum(X * R)) <= 1e-8 * scale * max(np.abs(X).max(), 1.0)
        assert sdcp_violation(A, B, X) <= 1e-8


def test_no_curvature_where_the_margin_is_negative_is_an_error():
    B = np.zeros((2, 2, 2, 2))
    B[0, 0, 0, 0] = 1.0  # nothing moves the (1, 1) margin
    with pytest.raises(ComplementarityError, match="grows without bound|nothing can restore"):
        solve_sdcp(np.diag([0.5, -1.0]), B)
    with pytest.raises(ComplementarityError, match="no curvature"):
        solve_sdcp(np.array([[-1.0]]), np.zeros((1, 1, 1, 1)))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"A must be \(k, k\) and B \(k, k, k, k\)"):
        solve_sdcp(np.zeros((2, 2)), np.zeros((2, 2)))
