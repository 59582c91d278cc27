"""Eigensolvers and spectral estimators on a :class:`~eos_toolkit.operators.LinearOperator`.

Every function takes the operator (a symmetric ``A`` known by its products:
``dim``, ``dtype``, ``device``, ``matvec`` / ``matmat``, ``agree``) and keeps
all vectors on its device: the loop bodies queue device work only.  Vectors
are in the operator's dtype unless ``dtype`` says otherwise (float64
solver arithmetic on a float32 model, say).  The one kind of host
synchronisation is the convergence test, which reads a few residual norms;
each such place is marked ``# sync:``.

* :func:`lanczos` - top-k (largest algebraic) eigenpairs by Lanczos with full
  reorthogonalisation, warm-startable from previous eigenvectors; its basis
  can live in a :class:`KrylovWorkspace` kept between solves.
* :func:`block_lanczos` - the same with a block of starting vectors, for a
  cluster of (near-)equal top eigenvalues, as at the edge of stability.
* :func:`tridiagonal` - a Lanczos recurrence's coefficients as its dense
  tridiagonal ``T``, whose eigenpairs are the Ritz pairs.
* :func:`power_iteration` - the classic baseline (largest *magnitude*).
* :func:`hutchinson_trace` - ``tr(A)`` with its standard error.
* :func:`slq_density` / :func:`gaussian_density` - the spectral density by
  stochastic Lanczos quadrature.

Example::

    >>> import torch
    >>> from eos_toolkit.operators import MatrixOperator
    >>> A = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -5.0], dtype=torch.float64)))
    >>> res = lanczos(A, k=1, tol=1e-10)
    >>> round(float(res.eigenvalues[0]), 6)
    3.0
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .operators import LinearOperator


@dataclass
class EigResult:
    """Eigenpairs from a solver.

    eigenvalues: (k,) descending; eigenvectors: (dim, k) orthonormal columns;
    residuals: (k,) norms ``|A y - theta y|`` (Lanczos: the exact Ritz-residual
    formula from the recurrence, no extra products); n_matvecs: products used;
    converged: whether every residual met the tolerance;
    history: (n_matvecs,) top eigenvalue estimate after each product, kept on
    request (``keep_history=True``) for convergence studies.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool
    history: torch.Tensor | None = None


def _check_common(dim: int, k: int, tol: float) -> None:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must lie in [1, dim={dim}], got {k}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")


def _check_krylov(dim: int, k: int, tol: float, *, which: str, check_every: int | None, criterion: str,
                  max_iter: int) -> int:
    """The Lanczos solvers' arguments checked; returns ``max_iter`` capped at ``dim``."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    _check_common(dim, k, tol)
    if check_every is not None and check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is below k={k}")
    return max_iter


def _orthogonalise(block: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove from the rows of ``block`` their components along the orthonormal rows of ``basis``, twice.

    Returns the cleaned block and the coefficients ``basis @ block^T`` removed
    (classical Gram-Schmidt applied twice: "twice is enough").
    """
    coeff = basis @ block.T
    block = block - coeff.T @ basis
    again = basis @ block.T
    return block - again.T @ basis, coeff + again


def _top_ritz(T: torch.Tensor, k: int, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k wanted Ritz values and vectors of ``T``, and the distance of each to the nearest other Ritz value."""
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    idx = torch.arange(T.shape[0] - 1, T.shape[0] - 1 - k, -1, device=T.device) if which == "largest" \
        else torch.arange(k, device=T.device)
    distance = (theta[idx].unsqueeze(1) - theta.unsqueeze(0)).abs()
    distance[torch.arange(k, device=T.device), idx] = float("inf")
    return theta[idx], S[:, idx], distance.min(dim=1).values


def eigenvalue_error_bound(residuals: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """``min(r, r^2 / gap)``: the error of a Ritz value with residual ``r`` (Temple / Kato).

    ``|lambda - theta| <= r`` always; ``<= r^2 / delta`` when no other eigenvalue
    lies within ``delta`` of ``theta``.  ``gap`` is the distance to the nearest
    other Ritz value, the usual estimate of ``delta``; in a tight cluster it is
    small and the bound falls back to ``r``, as it does without another Ritz value (``gap = inf``).
    It is an estimate, not a guarantee: after a few products the nearest
    Ritz value lies below the eigenvalue it approaches, the estimated gap is
    too large and the bound too small.  Measured: a warm start on the
    sharpness benchmark's CNN stopped after 2 products at 1.2e-3 relative
    error with ``tol=1e-3``.  The tracker stops on residuals, which bound the
    error without a gap.
    """
    usable = torch.isfinite(gaps) & (gaps > 0)  # a zero gap (equal Ritz values) gives no second-order bound
    return torch.where(usable, torch.minimum(residuals, residuals ** 2 / torch.where(usable, gaps, 1.0)), residuals)


class KrylovWorkspace:
    """A Krylov basis buffer kept across solves: allocated once, grown when needed, never zero-filled.

    A tracker measures every few steps with the same operator; allocating and
    zero-filling a ``(max_iter + 1) x dim`` basis each time (320 MB for a
    200k-parameter model in float64) costs as much as the products.  Rows are
    written before they are read, so the buffer is made with ``torch.empty``
    and only the rows a solve uses are ever touched.  Not thread-safe: one
    solve at a time per workspace.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def basis(self, rows: int, dim: int, dtype: torch.dtype, device, *, keep: int = 0) -> torch.Tensor:
        """A ``(rows, dim)`` view of the buffer; contents are garbage until written, except the first ``keep`` rows.

        Grows (to ``rows``, at least doubling) only when a solve needs more rows
        than any before it, copying the ``keep`` rows already written, so a
        run of warm solves of a few products holds a few rows, not ``max_iter``.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        buf = self._buffer
        if buf is None or buf.shape[1] != dim or buf.dtype != dtype or buf.device != device:
            self._buffer = None  # free the old one first
            self._buffer = buf = torch.empty(rows, dim, dtype=dtype, device=device)
        elif buf.shape[0] < rows:
            grown = torch.empty(max(rows, 2 * buf.shape[0]), dim, dtype=dtype, device=device)
            grown[:keep] = buf[:keep]
            self._buffer = buf = grown
        return buf[:rows]


def block_lanczos(op: LinearOperator, k: int = 1, *, block_size: int | None = None, max_iter: int = 200,
                  tol: float = 1e-6, v0: torch.Tensor | None = None, which: str = "largest",
                  dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                  check_every: int = 2, criterion: str = "residual", keep_history: bool = False,
                  workspace: KrylovWorkspace | None = None) -> EigResult:
    """Top-k eigenpairs of a symmetric operator by block Lanczos with full reorthogonalisation.

    The Krylov basis ``Q = [Q_1, Q_2, ...]`` (blocks of ``b`` orthonormal
    vectors) is extended by ``A Q_j`` orthogonalised twice against all of
    ``Q``; the removed coefficients and the QR factor of the remainder fill
    ``T = Q^T A Q``.  Ritz pairs ``(theta, Q s)`` of ``T`` satisfy
    ``|A Q s - theta Q s| = |R_last s_last|`` (``R_last`` the coupling to the
    next block, ``s_last`` the last block of ``s``), which is the residual
    reported.  Stopping rule: every wanted pair has ``residual <= tol * max |theta|``
    (``criterion="residual"``: accurate eigenvectors too), or
    ``eigenvalue_error_bound(residual, gap) <= tol * max |theta|``
    (``criterion="eigenvalue"``: eigenvalues to ``tol``, fewer products, looser vectors).

    ``op.matmat`` takes the ``(dim, b)`` blocks.  max_iter: most products (basis size).
    v0: ``(dim,)`` or ``(dim, m)`` starting vectors (previous eigenvectors
    for a warm start); missing columns are random.  which: ``"largest"`` or
    ``"smallest"`` (algebraic).  The convergence test (a host sync) runs after
    each of the first ``check_every`` blocks once ``k`` vectors exist, where
    a warm start finishes, and every ``check_every`` blocks after that.
    When a block becomes (numerically) invariant its couplings are zero and
    the basis continues from random vectors, so ``T`` splits into
    independent blocks and nothing is lost.  Each block is orthogonalised
    twice against the whole basis (blocks lose orthogonality faster than
    single vectors, and a QR of a nearly dependent block needs it), then
    once more after its QR to guard rank-deficient blocks; ``workspace``
    keeps the basis between solves as in :func:`lanczos`.
    """
    dim, dtype, device = op.dim, dtype or op.dtype, op.device
    max_iter = _check_krylov(dim, k, tol, which=which, check_every=check_every, criterion=criterion,
                             max_iter=max_iter)
    b = block_size or (1 if v0 is None or v0.dim() == 1 else v0.shape[1])
    if not 1 <= b <= dim:
        raise ValueError(f"block_size must lie in [1, dim={dim}], got {b}")
    n_blocks = -(-max_iter // b)
    basis_cap = n_blocks * b
    eps = torch.finfo(dtype).eps

    def randn(rows: int) -> torch.Tensor:
        return torch.randn(rows, dim, dtype=dtype, device=device, generator=generator)

    start = randn(b)
    if v0 is not None:
        given = (v0 if v0.dim() == 2 else v0.unsqueeze(1)).to(dtype=dtype, device=device).T
        if given.shape[1] != dim:
            raise ValueError(f"v0 has {given.shape[1]} rows, expected dim={dim}")
        if given.shape[0] > b:
            # More previous eigenvectors than block columns: their sum spans them in a few steps.
            given = torch.cat([given[: b - 1], given[b - 1:].sum(0, keepdim=True)])
        start[: given.shape[0]] = given
    Q = (workspace or KrylovWorkspace()).basis(basis_cap + b, dim, dtype, start.device)
    T = torch.zeros(basis_cap + b, basis_cap, dtype=dtype, device=device)
    on_host = _on_host(start.device)
    Q[:b] = torch.linalg.qr(start.T).Q.T
    history = [] if keep_history else None
    m = 0
    checks = 0
    result = None
    while m < max_iter:
        width = min(b, max_iter - m)
        block = Q[m:m + width]
        W = op.matmat(block.T.contiguous()).T.to(dtype)
        norms_in = W.norm(dim=1)
        W, coeff = _orthogonalise(W, Q[:m + width])
        # Columns with nothing left are an invariant subspace: continue from random vectors,
        # recording a zero coupling (device-side select, no sync).
        dead = W.norm(dim=1) <= dim ** 0.5 * eps * norms_in.clamp_min(torch.finfo(dtype).tiny)
        if not on_host or bool(dead.any()):  # on the host, draw only when a column died
            W = torch.where(dead.unsqueeze(1), randn(width), W)
            W, _ = _orthogonalise(W, Q[:m + width])
        Qn, R = torch.linalg.qr(W.T)
        Qn, _ = _orthogonalise(Qn.T, Q[:m + width])  # guards rank-deficient blocks
        Qn, R2 = torch.linalg.qr(Qn.T)
        R = (R2 @ R) * (~dead).to(dtype)  # zero coupling for restarted columns
        T[:m + width, m:m + width] = coeff
        T[m + width:m + 2 * width, m:m + width] = R
        Q[m + width:m + 2 * width] = Qn.T
        m += width
        if keep_history:
            history.extend(torch.linalg.eigvalsh(T[:j, :j] + T[:j, :j].T)[-1 if which == "largest" else 0] / 2
                           for j in range(m - width + 1, m + 1))
        if m < k:
            continue
        checks += 1
        if checks <= check_every or checks % check_every == 0 or m >= max_iter:
            theta, S, gaps = _top_ritz(T[:m, :m], k, which)
            residuals = (T[m:m + width, m - width:m] @ S[m - width:m]).norm(dim=0)
            scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
            errors = eigenvalue_error_bound(residuals, gaps) if criterion == "eigenvalue" else residuals
            converged = op.agree(bool((errors <= tol * scale).all()))  # sync: convergence test
            result = (theta, S, residuals, converged)
            if converged:
                break
    theta, S, residuals, converged = result
    return EigResult(eigenvalues=theta, eigenvectors=Q[:m].T @ S, residuals=residuals,
                     n_matvecs=m, converged=converged,
                     history=torch.stack(history) if keep_history else None)


def _non_finite(step: int) -> ValueError:
    return ValueError(f"the operator returned non-finite values (Lanczos step {step}): inf or NaN in the "
                      "products, or overflow; check the model and loss at the current parameters")


def _on_host(device: torch.device) -> bool:
    """Whether the solver's scalars live on the host, where reading them is free (a Python branch, no sync)."""
    return device.type == "cpu"


def _reorthogonalise(w: torch.Tensor, basis: torch.Tensor, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A second classical Gram-Schmidt pass of ``w`` (in place) over ``basis``: the coefficients in all, and ``|w|``."""
    again = torch.mv(basis, w)
    w.addmv_(basis.T, again, alpha=-1)
    return coeff + again, w.norm()


def _orthogonal_random(basis: torch.Tensor, generator) -> torch.Tensor:
    """A random vector orthogonal to ``basis`` (two passes): where a Krylov space turned out invariant."""
    fresh = torch.randn(1, basis.shape[1], dtype=basis.dtype, device=basis.device, generator=generator)
    return _orthogonalise(fresh, basis)[0][0]


def _start_vector(v0, dim: int, dtype, device, generator) -> torch.Tensor:
    """``v0`` (a block summed into one vector), or a random one when there is none or it sums to zero."""
    if v0 is not None:
        v = (v0.sum(dim=1) if v0.dim() == 2 else v0).to(dtype=dtype, device=device)
        if v.shape[0] != dim:
            raise ValueError(f"v0 has {v.shape[0]} rows, expected dim={dim}")
        if bool(v.norm() > 0):  # sync: once per solve
            return v
    return torch.randn(dim, dtype=dtype, device=device, generator=generator)


def lanczos(op: LinearOperator, k: int = 1, *, max_iter: int = 200, tol: float = 1e-6,
            v0: torch.Tensor | None = None, which: str = "largest", dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None, check_every: int | None = None,
            criterion: str = "residual", keep_history: bool = False,
            workspace: KrylovWorkspace | None = None) -> EigResult:
    """Top-k eigenpairs by single-vector Lanczos with full reorthogonalisation.

    Step ``j`` computes ``w = A q_j``, first applies the three-term
    recurrence (``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``,
    ``O(dim)``), which removes the large
    components, then one classical Gram-Schmidt pass over the whole basis
    (two matrix-vector products with the ``(j+1) x dim`` basis), which
    removes what rounding left along it.  A single pass over ``A q_j``
    itself would not do: it leaves the basis's own loss of orthogonality
    amplified by ``|A q_j| / |w|``, which compounds from step to step once a
    Ritz vector converges or when the spectrum sits far from 0 (``|alpha_j|
    >> beta_j``), and copies ("ghosts") of converged eigenvalues, or values
    outside the spectrum, appear.  After the recurrence the components left
    are already at the level of that loss, so the pass leaves only its
    square: full reorthogonalisation at the cost of one pass.  A second pass
    runs when the first still removed more than a factor ``1/sqrt 2`` of the
    norm (the Daniel-Gragg-Kaufman-Stewart test, ARPACK's); "twice is
    enough".  On the CPU that test is a free Python branch; on an
    accelerator it would be a host sync per step, so there the second pass
    always runs.  The pass runs at every step: partial reorthogonalisation
    (a pass only when an estimate of the loss of orthogonality, Simon's
    omega recurrence or Paige's ``eps |A| / residual``, exceeds
    ``sqrt(eps)``) would save most passes of a cold solve, but on network
    Hessians those estimates, calibrated on the first steps, missed the
    measured loss by up to about a hundredfold, in both directions (the
    sharpness benchmark's MLP and CNN, float32 and float64 vectors).

    ``T`` is the tridiagonal of the ``alpha_j`` (diagonal) and ``beta_j``
    (the norms of the orthogonalised ``w``); its Ritz pairs ``(theta, Q s)``
    have residual ``|A Q s - theta Q s| = beta_m |s_m|``, reported without
    extra products.  When ``w`` vanishes (an invariant subspace: exact
    arithmetic has found every eigenvalue the start vector sees), the basis
    continues from a random vector orthogonal to it with a zero coupling, so
    ``T`` splits.  Which copies of a repeated eigenvalue a single start
    vector finds before every residual is 0 is luck (a rank-3 operator
    asked for 4 eigenvalues may answer its 3 and one 0, and stop): for
    multiplicities use :func:`block_lanczos`.

    ``v0`` may be one vector or a ``(dim, m)`` block of previous eigenvectors;
    a block is summed into one start vector, whose Krylov space contains all
    of them after ``m`` products when they are still eigenvectors.  Starting
    from an exact eigenvector the solve ends after one product.  Stopping
    rule: every wanted pair has ``residual <= tol * max |theta|``
    (``criterion="residual"``) or ``eigenvalue_error_bound(residual, gap) <=
    tol * max |theta|`` (``criterion="eigenvalue"``), tested (in numpy on
    the small ``T``: one host sync on an accelerator) after each of the first ``check_every``
    steps once ``k`` vectors exist and every ``check_every`` steps after;
    by default after every step on the CPU (where the test costs nothing
    next to a product, and a warm start stops the moment it converges) and
    every second step on an accelerator (one sync fewer per two products).
    ``workspace``: a :class:`KrylovWorkspace` to keep the basis in between
    solves (a tracker passes its own); without one a basis is allocated.
    Processes that share the products (data-parallel ranks) make each stop
    decision together through ``op.agree``.
    For clusters of equal eigenvalues use :func:`block_lanczos`.
    """
    dim, dtype, device = op.dim, dtype or op.dtype, op.device
    max_iter = _check_krylov(dim, k, tol, which=which, check_every=check_every, criterion=criterion,
                             max_iter=max_iter)
    start = _start_vector(v0, dim, dtype, device, generator)
    on_host = _on_host(device)
    check_every = check_every or (1 if on_host else 2)
    eps = torch.finfo(dtype).eps
    noise = dim ** 0.5 * eps  # |w| below noise * |A q_j| is rounding: the Krylov space is invariant
    workspace = workspace or KrylovWorkspace()
    Q = workspace.basis(min(max_iter + 1, 16), dim, dtype, device)
    # The tridiagonal's coefficients, in float64: on the host the convergence test reads them in place.
    coefficients = torch.zeros(2, max_iter, dtype=torch.float64, device=device)
    alphas, betas = coefficients
    on_host_coefficients = coefficients.numpy() if on_host else None  # the same memory
    torch.div(start, start.norm(), out=Q[0])
    history = [] if keep_history else None
    result, checks, m = None, 0, 0
    zero = torch.zeros((), dtype=dtype, device=device)
    beta, beta_value = None, 0.0  # beta_{j-1}, the coupling to q_{j-1} (a tensor, and on the host its value)
    while m < max_iter:
        j, m = m, m + 1
        if Q.shape[0] < m + 1:
            Q = workspace.basis(min(max_iter + 1, 2 * Q.shape[0]), dim, dtype, device, keep=m)
        basis, q = Q[:m], Q[j]
        w = op.matvec(q).to(dtype)
        # The three-term recurrence, O(dim): the large components, along q_j and q_{j-1}.
        alpha = torch.dot(q, w)
        w = torch.addcmul(w, q, alpha, value=-1)  # a new tensor: the product may be its input itself
        if beta is not None:
            w.addcmul_(Q[j - 1], beta, value=-1)
        # One classical Gram-Schmidt pass over the whole basis: what rounding left along it, removed.
        coeff = torch.mv(basis, w)
        w.addmv_(basis.T, coeff, alpha=-1)  # in place: w is the solver's own tensor from here on
        size = w.norm()
        # |w|^2 before the pass is |coeff|^2 + size^2 (Pythagoras): no pass over w measures it; and
        # |A q_j|^2 is alpha^2 + beta_{j-1}^2 + that.
        coeff_sq = coeff.dot(coeff)
        if on_host:
            # Python numbers and free branches: on the host an operation on a 0-d tensor costs about as
            # much as a short vector operation, and this bookkeeping in tensors would take twenty.
            alpha_value, size_value, coeff_sq_value = torch.stack([alpha, size, coeff_sq]).tolist()
            local_sq = coeff_sq_value + size_value ** 2
            size_in = (alpha_value ** 2 + beta_value ** 2 + local_sq) ** 0.5
            if not math.isfinite(size_in):  # a norm that overflowed would pass for an invariant subspace below
                raise _non_finite(m)
            if 2 * size_value ** 2 < local_sq:  # DGKS: the pass cancelled over 1/sqrt 2 of |w|, once more
                coeff, size = _reorthogonalise(w, basis, coeff)
                size_value = size.item()
            on_host_coefficients[0, j] = alpha_value + coeff[j].item()
            dead = size_value <= noise * size_in
            if dead and m < max_iter:  # invariant subspace: on from a random vector, with coupling 0
                w = _orthogonal_random(basis, generator)
                size = w.norm()
            beta, beta_value = (zero, 0.0) if dead else (size, size_value)
            on_host_coefficients[1, j] = beta_value
        else:
            # The same steps without host syncs: the second pass always runs, and a restart vector is
            # always drawn and kept only where the space is invariant.
            beta_sq = beta.square() if beta is not None else 0
            size_in = (alpha.square() + beta_sq + coeff_sq + size.square()).sqrt()
            coeff, size = _reorthogonalise(w, basis, coeff)
            alphas[j] = alpha + coeff[j]
            dead = (size <= noise * size_in) & size_in.isfinite()  # an overflow is the convergence test's to name
            if m < max_iter:
                fresh = _orthogonal_random(basis, generator)
                w = torch.where(dead, fresh, w)
                size = torch.where(dead, fresh.norm(), size)
            betas[j] = beta = torch.where(dead, zero, size)
        if m < max_iter:
            torch.div(w, size, out=Q[m])
        if keep_history:
            T = tridiagonal(alphas[:m], betas[:m - 1])
            history.append(torch.linalg.eigvalsh(T)[-1 if which == "largest" else 0])
        if m < k:
            continue
        checks += 1
        if checks <= check_every or checks % check_every == 0 or m >= max_iter:
            # sync: convergence test, in numpy on the small tridiagonal (a copy from an accelerator).
            host = on_host_coefficients[:, :m] if on_host else coefficients[:, :m].cpu().numpy()
            if not np.isfinite(host).all():
                raise _non_finite(m)
            theta, S, gaps = _tridiagonal_ritz(host[0], host[1, :m - 1], k, which)
            residuals = abs(host[1, m - 1]) * np.abs(S[m - 1])
            scale = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
            usable = np.isfinite(gaps) & (gaps > 0)  # eigenvalue_error_bound, in numpy
            bound = np.divide(residuals ** 2, gaps, out=residuals.copy(), where=usable)
            errors = np.minimum(residuals, bound) if criterion == "eigenvalue" else residuals
            converged = op.agree(bool((errors <= tol * scale).all()))
            result = (theta, S, residuals, converged)
            if converged:
                break
    theta, S, residuals, converged = result
    as_tensor = functools.partial(torch.as_tensor, dtype=dtype, device=device)
    return EigResult(eigenvalues=as_tensor(theta), eigenvectors=Q[:m].T @ as_tensor(S),
                     residuals=as_tensor(residuals), n_matvecs=m, converged=converged,
                     history=torch.stack(history) if keep_history else None)


def tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal ``T`` of a Lanczos recurrence as a dense ``(m, m)`` matrix.

    ``T[j, j] = alphas[j]`` (the ``m`` diagonal coefficients ``q_j^T A q_j``)
    and ``T[j, j+1] = T[j+1, j] = betas[j]`` (the ``m - 1`` couplings); the
    eigenvalues of ``T`` are the Ritz values of ``A`` on the Krylov basis
    ``q_0 .. q_{m-1}``, and ``Q S`` its Ritz vectors for the eigenvectors
    ``S`` of ``T``.

    Example::

        >>> tridiagonal(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0])).tolist()
        [[2.0, 0.5, 0.0], [0.5, 3.0, 1.0], [0.0, 1.0, 4.0]]
    """
    return torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)


_STEV_ROWS = 32  # up to this size LAPACK's stev (O(m^3), no Python checks) beats scipy's eigh_tridiagonal


def _tridiagonal_ritz(alphas: np.ndarray, betas: np.ndarray, k: int, which: str):
    """:func:`_top_ritz` for the symmetric tridiagonal ``(alphas, betas)``, in numpy (float64).

    A tracker's convergence test runs after every product; on matrices of a
    few dozen rows numpy answers in microseconds where a chain of torch
    calls costs a noticeable share of a fast product.
    """
    if len(alphas) == 1:
        theta, S = alphas, np.ones((1, 1))
    elif len(alphas) <= _STEV_ROWS:
        # LAPACK's stev directly: scipy's eigh_tridiagonal wrapper validates its input in Python, which
        # costs more than the solve on a basis of a few dozen rows, once per product.
        theta, S, info = scipy.linalg.lapack.dstev(alphas, betas, compute_v=1)
        if info != 0:
            raise ValueError(f"the Lanczos tridiagonal's eigenvalues did not converge (LAPACK stev info {info})")
    else:
        theta, S = scipy.linalg.eigh_tridiagonal(alphas, betas)  # MRRR, O(m^2): stev's O(m^3) loses beyond
    idx = np.arange(len(theta) - 1, len(theta) - 1 - k, -1) if which == "largest" else np.arange(k)
    distance = np.abs(theta[idx][:, None] - theta[None, :])
    distance[np.arange(k), idx] = np.inf
    return theta[idx], S[:, idx], distance.min(axis=1)


def power_iteration(op: LinearOperator, *, max_iter: int = 1000, tol: float = 1e-6,
                    v0: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    generator: torch.Generator | None = None, check_every: int = 4,
                    keep_history: bool = False, which: str = "LM") -> EigResult:
    """The eigenpair of largest magnitude (``which="LM"``) or the largest eigenvalue (``"LA"``).

    ``v <- A v / |A v|``; the estimate is the Rayleigh quotient ``v^T A v``.
    Stops when the residual ``|A v - lambda v|`` is at most ``tol * |lambda|``
    (checked, with a host sync, every ``check_every`` products): a small
    change of the estimate between products is no proof, since with a ratio
    of the top two eigenvalues near 1 the estimate creeps while still far off.
    Power iteration converges to the eigenvalue of largest *magnitude*, which
    on an indefinite Hessian can be a negative one (-86.8 where lambda_max is
    5.3). ``which="LA"`` (what sharpness means) then runs a second, shifted
    power iteration on ``A - mu I`` with that negative ``mu``, whose dominant
    eigenvalue is ``lambda_max - mu``, started from ``v0`` (or a random
    vector) with the products left of ``max_iter``; ``n_matvecs`` counts both
    runs. Convergence is slow when eigenvalues cluster (``converged`` then
    says False); Lanczos (:func:`lanczos`) finds lambda_max in far fewer
    products, and this solver is kept for comparison.
    """
    if which not in ("LM", "LA"):
        raise ValueError(f"which must be 'LM' (largest magnitude) or 'LA' (largest algebraic), got {which!r}")
    dtype = dtype or op.dtype
    first = _power_iteration(op, max_iter=max_iter, tol=tol, v0=v0, dtype=dtype, generator=generator,
                             check_every=check_every, keep_history=keep_history)
    if which == "LM":
        return first
    mu = float(first.eigenvalues[0])  # sync: is the dominant eigenvalue negative?
    if op.agree(mu >= 0):
        return first
    second = _power_iteration(op, max_iter=max(2, max_iter - first.n_matvecs), tol=tol, v0=v0, dtype=dtype,
                              generator=generator, check_every=check_every, keep_history=keep_history, shift=mu)
    history = None if not keep_history else torch.cat([first.history, second.history])
    return EigResult(eigenvalues=second.eigenvalues, eigenvectors=second.eigenvectors,
                     residuals=second.residuals, n_matvecs=first.n_matvecs + second.n_matvecs,
                     converged=second.converged, history=history)


def _power_iteration(op: LinearOperator, *, max_iter: int, tol: float, v0, dtype, generator, check_every: int,
                     keep_history: bool, shift: float = 0.0) -> EigResult:
    """Power iteration on ``A - shift I``; eigenvalue, residual and history are reported for ``A``."""
    dim, device = op.dim, op.device
    _check_common(dim, 1, tol)
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    v = torch.randn(dim, dtype=dtype, device=device, generator=generator) if v0 is None \
        else v0.reshape(dim, -1).sum(1).to(dtype=dtype, device=device)
    v = v / v.norm()
    estimates = torch.zeros(max_iter, dtype=dtype, device=device)
    converged = False
    n = 0
    rayleigh = residual = torch.full((), float("nan"), dtype=dtype, device=device)
    vec = v
    for n in range(1, max_iter + 1):
        w = op.matvec(v).to(dtype)  # A v
        rayleigh = v @ w
        estimates[n - 1] = rayleigh
        residual = (w - rayleigh * v).norm()  # the same for A and A - shift I
        vec = v
        w = w - shift * v if shift else w
        v = w / w.norm()
        if n % check_every == 0 or n == max_iter:
            converged = op.agree(bool(residual <= tol * rayleigh.abs()))  # sync: convergence test
            if converged:
                break
    return EigResult(eigenvalues=rayleigh.reshape(1), eigenvectors=vec.unsqueeze(1),
                     residuals=residual.reshape(1), n_matvecs=n, converged=converged,
                     history=estimates[:n] if keep_history else None)


def rademacher(n: int, dim: int, *, dtype=torch.float64, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, dim)`` independent +-1 entries."""
    bits = torch.randint(0, 2, (n, dim), device=device, generator=generator)
    return (2 * bits - 1).to(dtype)


def hutchinson_trace(op: LinearOperator, *, n_samples: int = 100, dtype: torch.dtype | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tr(A) ~ mean_i z_i^T A z_i`` over Rademacher ``z_i``, and the standard error of that mean.

    Returns two 0-dim tensors on the device (no sync).  ``Var(z^T A z) = 2 sum_{i!=j} A_ij^2``.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a standard error, got {n_samples}")
    dtype = dtype or op.dtype
    Z = rademacher(n_samples, op.dim, dtype=dtype, device=op.device, generator=generator)
    samples = torch.stack([z @ op.matvec(z).to(dtype) for z in Z])
    return samples.mean(), samples.std() / n_samples ** 0.5


@dataclass
class SpectralDensity:
    """Quadrature nodes (Ritz values) and weights of the normalised spectral density.

    ``sum(weights) = 1``; ``sum(weights * nodes**p)`` estimates ``tr(A^p) / dim`` for ``p < 2 m``.
    ``per_probe_moments(p)`` returns the ``(n_probes,)`` per-probe estimates (for error bars).
    """

    nodes: torch.Tensor    # (n_probes, m)
    weights: torch.Tensor  # (n_probes, m), each row sums to 1

    def moment(self, p: int) -> torch.Tensor:
        return self.per_probe_moments(p).mean()

    def per_probe_moments(self, p: int) -> torch.Tensor:
        return (self.weights * self.nodes ** p).sum(dim=1)


def slq_density(op: LinearOperator, *, n_probes: int = 10, n_steps: int = 80, dtype: torch.dtype | None = None,
                generator: torch.Generator | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019).

    For each Rademacher probe ``z``, ``n_steps`` Lanczos steps from ``q = z / |z|``
    give ``T = S diag(theta) S^T``; then ``q^T f(A) q ~ sum_j S_0j^2 f(theta_j)``,
    and ``E[q^T f(A) q] = tr f(A) / dim``.  No convergence tests: one sync per probe, for the
    solver's final flag.
    """
    dtype = dtype or op.dtype
    n_steps = min(n_steps, op.dim)
    probes = rademacher(n_probes, op.dim, dtype=dtype, device=op.device, generator=generator)
    nodes, weights = [], []
    for z in probes:
        res = lanczos(op, k=n_steps, max_iter=n_steps, tol=0.0, v0=z, dtype=dtype, generator=generator,
                      check_every=n_steps)
        # The first basis vector is q, so the quadrature weight of Ritz pair j is (q . y_j)^2.
        q = z / z.norm()
        nodes.append(res.eigenvalues)
        weights.append((q @ res.eigenvectors) ** 2)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights))


def gaussian_density(density: SpectralDensity, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """The SLQ density broadened by a Gaussian of width ``sigma``, evaluated at ``grid``.

    ``phi(t) = mean_probes sum_j w_j N(t; theta_j, sigma^2)``; integrates to 1.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    nodes = density.nodes.reshape(-1).to(grid.dtype)
    weights = density.weights.reshape(-1).to(grid.dtype) / density.nodes.shape[0]
    z = (grid.unsqueeze(1) - nodes) / sigma
    return (weights * torch.exp(-0.5 * z ** 2)).sum(1) / (sigma * (2 * torch.pi) ** 0.5)
