"""Benchmark the curvature engine on real data: HVP cost, the cost of the top eigenvalue, and the peers.

For the edge-of-stability MLP (784-200-200-10, tanh) and a small CNN (two
3x3 convolutions, tanh), each after a chosen number of full-batch
gradient-descent steps on a class-balanced Fashion-MNIST subset with MSE on
one-hot targets (``--configs``: ``mlp-init`` = MLP at initialisation,
``mlp-trained`` = MLP after 200 steps at lr 0.05, ``cnn`` = CNN at
initialisation, or any ``MODEL:STEPS``), it prints three sections
(``--sections``, default all):

* ``hvp``: the wall time of one Hessian-vector product per method, as a ratio
  to one full-batch gradient (medians over interleaved repeats);
* ``solvers``: for the top Hessian eigenvalue, the products and seconds each
  solver takes: our Lanczos (cold, and warm-started after one training
  step), our power iteration, ``scipy.sparse.linalg.eigsh`` with ``tol=0``
  (the setting of the classic edge-of-stability code) and with ``tol=1e-3``.
  "to 1e-3" is the first product after which the solver's estimate is within
  1e-3 (relative) of a tight reference (Lanczos, residual 1e-10): an oracle
  count; "stop" is where the solver's own rule stopped, with the error it had
  there;
* ``peers``: the same question answered by the peer libraries, each with its
  own operator and stopping rule (:mod:`experiments.benchmarks.peers`:
  PyHessian's power iteration, hessian-eigenthings' Lanczos and power
  iteration, curvlinops' operator under ``eigsh``), and by ours, a
  :class:`eos_toolkit.tracker.SharpnessTracker` with its defaults: a
  measurement from a random start ("cold"), and one GD step later ("warm")
  its next measurement from the same start vector the warm peers get (the
  previous reference eigenvector) and from its own previous eigenvector, as
  a run measures; then a short run measuring after every GD step
  (``--warm-steps``), to show what warm measurements cost as training
  moves.  Every row: products, wall seconds, relative error to a tight reference (our
  Lanczos, float64 vectors, eigenvalue bound 1e-10), and the ratios of
  products and seconds to the *best accurate peer*: the fastest peer run
  within 1e-3 relative error.  Peer products are counted inside each peer's
  operator; ours are the tracker's own ``hessian_matvecs`` and
  ``hessian_seconds``.  Peers that are not installed are skipped with the
  command that installs them (``pip install "eos-toolkit[bench]"``, then
  ``pip install --no-deps curvlinops-for-pytorch``).

Targets checked at the end of each section: HVP (forward-over-reverse) <= 4
gradients on the CPU; cold Lanczos (own stop, tol 1e-3) <= 1/3 of
eigsh(tol=0)'s products; warm start after one step, and every measurement of
the short run, <= 5 products; ours cold
and warm <= 0.8 x the best accurate peer's products and <= 0.7 x its
seconds, within 1e-3 relative error.

    python -m experiments.benchmarks.sharpness --n-examples 1000 --threads 2
    python -m experiments.benchmarks.sharpness --sections peers --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import math
import statistics
import sys
from dataclasses import dataclass

import torch
from torch import nn

from eos_toolkit.hvp import hessian_operator
from eos_toolkit.operators import FunctionOperator, as_scipy_linear_operator
from eos_toolkit.settings import METHODS
from eos_toolkit.solvers import KrylovWorkspace, lanczos, power_iteration, tridiagonal
from experiments.benchmarks.timing import interleaved_medians, timed
from experiments.tasks import base as task_base

REL_TARGET = 1e-3
SAME_START = "ours warm, same start"
OWN_START = "ours warm, own previous vector"


def load_subset(n: int, data_dir: str | None, device: torch.device):
    """A class-balanced Fashion-MNIST training subset: images and one-hot float targets."""
    try:
        from experiments.data import balanced_subset, load_dataset
    except ImportError as err:  # the data layer is part of this package; say what is missing
        raise SystemExit(f"experiments.data is not importable ({err}); the benchmark needs its "
                         "Fashion-MNIST reader") from err
    data = balanced_subset(load_dataset("fashion-mnist", "train", data_dir=data_dir), n, seed=0)
    targets = nn.functional.one_hot(data.labels, data.num_classes).float()
    return data.images.to(device), targets.to(device), data.source


def build(name: str, seed: int, device: torch.device) -> nn.Module:
    from experiments.models import build_model

    if name == "mlp":
        return build_model("mlp-tanh", (1, 28, 28), 10, seed=seed).to(device)
    return build_model("cnn-small", (1, 28, 28), 10, seed=seed, width=16, activation="tanh").to(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gd_step(model: nn.Module, chunks, lr: float) -> None:
    """One full-batch gradient-descent step on the size-weighted mean MSE."""
    model.zero_grad()
    for x, y, weight in task_base.size_weighted(chunks):
        (nn.functional.mse_loss(model(x), y) * weight).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def full_gradient(model: nn.Module, chunks) -> None:
    params = list(model.parameters())
    for x, y, weight in task_base.size_weighted(chunks):
        torch.autograd.grad(nn.functional.mse_loss(model(x), y) * weight, params)


def hvp_ratios(model, chunks, repeats: int) -> dict[str, float]:
    """Median HVP time / median gradient time, interleaving the contenders.

    Each operator is inside a measurement, as in the tracker: reuse_graph's
    figure is its per-product cost once its graphs exist (built in the warm-up).
    """
    device = model_device(model)
    ops = {m: hessian_operator(model, nn.functional.mse_loss, chunks, method=m) for m in METHODS}
    v = torch.randn(ops[METHODS[0]].dim, device=device)
    contenders = {"gradient": lambda: full_gradient(model, chunks)}
    contenders.update({m: (lambda op=op: op.matvec(v)) for m, op in ops.items()})
    model.eval()
    with contextlib.ExitStack() as stack:
        for op in ops.values():
            stack.enter_context(op.measurement())
        medians = interleaved_medians(contenders, device, repeats=repeats, warmup=1)
    grad_time = medians["gradient"]
    return {"gradient_seconds": grad_time, **{m: medians[m] / grad_time for m in METHODS}}


def first_within(history: torch.Tensor, reference: float) -> int | None:
    """1-based index of the first estimate within REL_TARGET of the reference (None if never)."""
    hits = ((history - reference).abs() <= REL_TARGET * abs(reference)).nonzero()
    return int(hits[0]) + 1 if len(hits) else None


def row(name: str, stop: float, oracle: float | None, error: float, seconds: float) -> str:
    oracle_text = "never" if oracle is None else f"{oracle:g}"
    return f"  {name:<34} {stop:>6g} {oracle_text:>9} {error:>11.2e} {seconds:>9.2f}"


def median_row(name: str, runs: list[tuple[int, int | None, float, float]]) -> str:
    """Medians over trials of (products at stop, oracle products, relative error, seconds)."""
    oracles = [r[1] for r in runs]
    oracle = None if None in oracles else statistics.median(oracles)
    return row(name, statistics.median(r[0] for r in runs), oracle,
               statistics.median(r[2] for r in runs), statistics.median(r[3] for r in runs))


def power_stop(history: torch.Tensor, tol: float) -> int:
    """Where PyHessian's rule (relative change of the estimate below tol) stops: 1-based."""
    change = (history[1:] - history[:-1]).abs() <= tol * history[1:].abs()
    hits = change.nonzero()
    return int(hits[0]) + 2 if len(hits) else len(history)


@dataclass(frozen=True)
class SolverSettings:
    """What the solvers section runs."""

    seed: int
    lr: float  # the GD step between the cold and the warm solves
    max_iter: int  # Lanczos product budget
    power_iter: int  # power-iteration product budget
    trials: int  # random starts per cold solver (medians)


def solver_table(op, reference: float, settings: SolverSettings, lines: list[str]) -> dict[str, float]:
    """Rows of products, oracle products, error and time per solver (medians over ``settings.trials`` starts)."""
    from scipy.sparse.linalg import eigsh

    lines += [f"  {'solver (median of %d starts)' % settings.trials:<34} {'stop':>6} {'to 1e-3':>9} "
             f"{'rel. error':>11} {'seconds':>9}"]
    counts: dict[str, float] = {}
    for criterion in ("residual", "eigenvalue"):
        runs = []
        for trial in range(settings.trials):
            generator = torch.Generator(device=op.device).manual_seed(settings.seed + trial)
            res, seconds = timed(functools.partial(
                lanczos, op, 1, tol=REL_TARGET, max_iter=settings.max_iter, criterion=criterion,
                generator=generator, keep_history=True), op.device)
            error = abs(float(res.eigenvalues[0]) - reference) / abs(reference)
            runs.append((res.n_matvecs, first_within(res.history, reference), error, seconds))
        counts[f"lanczos_{criterion}"] = statistics.median(r[0] for r in runs)
        counts["lanczos_oracle"] = statistics.median(r[1] or settings.max_iter for r in runs)
        lines.append(median_row(f"lanczos cold ({criterion} 1e-3)", runs))
    generator = torch.Generator(device=op.device).manual_seed(settings.seed)
    power, seconds = timed(functools.partial(
        power_iteration, op, tol=0.0, max_iter=settings.power_iter, check_every=settings.power_iter,
        generator=generator, keep_history=True), op.device)
    history = power.history
    stop = power_stop(history, REL_TARGET)
    error = abs(float(history[stop - 1]) - reference) / abs(reference)
    lines.append(row("power iteration (change 1e-3)", stop, first_within(history, reference), error,
                     seconds * stop / len(history)))
    for tol in (0.0, REL_TARGET):
        runs = []
        for trial in range(settings.trials):
            start = torch.randn(op.dim, generator=torch.Generator().manual_seed(settings.seed + trial),
                                dtype=torch.float64).numpy()
            before = op.n_matvecs
            values, seconds = timed(functools.partial(
                eigsh, as_scipy_linear_operator(op), k=1, which="LA", tol=tol, v0=start,
                return_eigenvectors=False), op.device)
            error = abs(float(values[0]) - reference) / abs(reference)
            runs.append((op.n_matvecs - before, 0, error, seconds))
        counts[f"eigsh_tol{tol:g}"] = statistics.median(r[0] for r in runs)
        lines.append(median_row(f"scipy eigsh (tol={tol:g})", runs).replace("        0 ", "        - "))
    lines.append("  (the power-iteration row uses PyHessian's stopping rule; PyHessian itself and the other peer "
                 "libraries run in --sections peers)")
    return counts


class Printer(list):
    """Collects the lines of a model's section and prints each as it comes (long runs show progress)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


CONFIGS = {"mlp-init": ("mlp", 0), "mlp-trained": ("mlp", 200), "cnn": ("cnn", 0)}
MODELS = ("mlp", "cnn")
SECTIONS = ("hvp", "solvers", "peers")


def parse_config(text: str) -> tuple[str, str, int]:
    """``mlp-init`` | ``mlp-trained`` | ``cnn`` | ``MODEL:STEPS`` -> (label, model, GD steps before measuring)."""
    if text in CONFIGS:
        return (text, *CONFIGS[text])
    model, sep, steps = text.partition(":")
    if not sep or model not in MODELS or not steps.isdigit():
        raise argparse.ArgumentTypeError(
            f"a config is one of {sorted(CONFIGS)} or MODEL:STEPS with MODEL in {MODELS} and STEPS >= 0, "
            f"got {text!r}")
    return text, model, int(steps)


def trained_model(name: str, steps: int, chunks, *, seed: int, lr: float, device: torch.device) -> nn.Module:
    """The model ``name`` (seeded by ``seed``) after ``steps`` full-batch GD steps at ``lr`` on the chunks."""
    torch.manual_seed(seed)
    model = build(name, seed, device)
    for _ in range(steps):
        gd_step(model, chunks, lr)
    return model


def describe(config: tuple[str, str, int], model, chunks, lr: float) -> str:
    """The title of a config's sections: the model, its size, the data and the GD steps it took."""
    label, name, steps = config
    n_params = sum(p.numel() for p in model.parameters())
    n_examples = sum(len(t) for _, t in chunks)
    return (f"{label}: {name}, {n_params:,} parameters, {n_examples} examples in {len(chunks)} chunk(s), "
            f"after {steps} GD steps at lr {lr}")


def verdict_lines(kind: str, verdict: dict[str, bool | None]) -> list[str]:
    """``  <kind> PASS|FAIL: <text>`` per checked target (``SKIP`` where it is None: nothing to compare with)."""
    return [f"  {kind} {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}: {text}" for text, ok in verdict.items()]


def reference_eigen(model, chunks, *, seed: int, max_iter: int, v0=None):
    """A tight lambda_1: our Lanczos on float64 vectors, eigenvalue error bound <= 1e-10 relative (or ``max_iter``)."""
    from eos_toolkit.solvers import eigenvalue_error_bound

    op = hessian_operator(model, nn.functional.mse_loss, chunks, dtype=torch.float64)
    generator = torch.Generator(device=op.device).manual_seed(seed)
    tight = lanczos(op, 2, tol=1e-10, max_iter=max_iter, v0=v0, criterion="eigenvalue",
                    generator=generator)
    value = float(tight.eigenvalues[0])
    bound = float(eigenvalue_error_bound(tight.residuals[:1], (tight.eigenvalues[:1] - tight.eigenvalues[1:]).abs()))
    text = (f"lambda_1 = {value:.6f} (our Lanczos, float64 vectors: residual {float(tight.residuals[0]):.1e}, "
            f"error bound {bound / abs(value):.0e} relative, {tight.n_matvecs} products)")
    return value, tight.eigenvectors[:, 0], text


def hvp_section(title: str, model, chunks, repeats: int) -> dict[str, bool]:
    """The hvp section of one config: each product rule's time as a ratio to a gradient's (medians of ``repeats``)."""
    out = Printer()
    out.append(f"== hvp: {title} ==")
    ratios = hvp_ratios(model, chunks, repeats)
    out.append(f"  gradient: {ratios['gradient_seconds'] * 1e3:.1f} ms (median of {repeats})")
    out += [f"  HVP {m:<22} {ratios[m]:5.2f} x gradient" for m in METHODS]
    verdict = {f"HVP forward-over-reverse <= 4 x gradient ({ratios['forward_over_reverse']:.2f})":
               ratios["forward_over_reverse"] <= 4.0}
    out += verdict_lines("target", verdict)
    return verdict


def solver_section(title: str, model, chunks, settings: SolverSettings) -> dict[str, bool]:
    """The solvers section of one config: each solver cold, then Lanczos warm one GD step later."""
    out = Printer()
    out.append(f"== solvers: {title} ==")
    op = hessian_operator(model, nn.functional.mse_loss, chunks, dtype=torch.float64)
    generator = torch.Generator(device=op.device).manual_seed(settings.seed)
    tight = lanczos(op, 1, tol=1e-10, max_iter=400, generator=generator)
    reference = float(tight.eigenvalues[0])
    out.append(f"  reference lambda_1 = {reference:.6f} (Lanczos, residual {float(tight.residuals[0]):.1e}, "
               f"{tight.n_matvecs} products)")
    counts = solver_table(op, reference, settings, out)
    # Warm start: one training step later, start from the previous top eigenvector.
    previous = tight.eigenvectors
    gd_step(model, chunks, settings.lr)
    new_reference = float(lanczos(op, 1, tol=1e-10, max_iter=400, v0=previous, generator=generator).eigenvalues[0])
    out.append(f"  one GD step later: lambda_1 = {new_reference:.6f}")
    warm_counts = {}
    for criterion in ("residual", "eigenvalue"):
        warm, seconds = timed(functools.partial(
            lanczos, op, 1, tol=REL_TARGET, max_iter=settings.max_iter, v0=previous, criterion=criterion,
            generator=generator, keep_history=True), op.device)
        warm_counts[criterion] = warm.n_matvecs
        error = abs(float(warm.eigenvalues[0]) - new_reference) / abs(new_reference)
        out.append(row(f"lanczos warm ({criterion} 1e-3)", warm.n_matvecs,
                       first_within(warm.history, new_reference), error, seconds))
    eigsh_products = counts["eigsh_tol0"]
    verdict = {
        f"cold Lanczos reaches 1e-3 within 1/3 of eigsh(tol=0)'s products "
        f"({counts['lanczos_oracle']:g} vs {eigsh_products:g})":
            counts["lanczos_oracle"] * 3 <= eigsh_products,
        f"cold Lanczos, eigenvalue rule, <= 1/3 of eigsh(tol=0) products "
        f"({counts['lanczos_eigenvalue']:g} vs {eigsh_products:g})":
            counts["lanczos_eigenvalue"] * 3 <= eigsh_products,
        f"cold Lanczos, residual rule, <= 1/3 of eigsh(tol=0) products "
        f"({counts['lanczos_residual']:g} vs {eigsh_products:g})":
            counts["lanczos_residual"] * 3 <= eigsh_products,
        f"warm start after one step <= 5 products ({warm_counts['residual']}, {warm_counts['eigenvalue']})":
            max(warm_counts.values()) <= 5,
    }
    out += verdict_lines("target", verdict)
    return verdict


# -- peers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerSettings:
    """What the peers section runs."""

    seed: int
    lr: float  # the GD step between cold and warm, and the short run's steps
    tols: tuple[float, ...]  # the tol given to each peer's own stopping rule (one row per value)
    max_iter: int  # each peer's product budget
    trials: int  # random starts per peer row and for ours (medians), interleaved across the rows
    reference_iter: int  # product budget of the tight reference
    warm_steps: int  # GD steps of the short run that measures after each (0: none)


def summarize(results: list, reference: float) -> dict:
    """Medians over trials of products, seconds and relative error; converged count; the median trial's stop reason.

    The median trial is the one whose product count is nearest the median (the first such).
    """
    errors = [abs(r.eigenvalue - reference) / abs(reference) if math.isfinite(r.eigenvalue) else math.inf
              for r in results]
    products = statistics.median(r.products for r in results)
    middle = min(results, key=lambda r: abs(r.products - products))
    return {"products": products,
            "seconds": statistics.median(r.seconds for r in results),
            "error": statistics.median(errors),
            "converged": f"{sum(bool(r.converged) for r in results)}/{len(results)}",
            "stop": middle.stop_reason}


def three_term_lanczos(matvec, dim: int, steps: int, dtype, device, generator) -> tuple[float, torch.Tensor]:
    """The top Ritz pair after ``steps`` products of a Lanczos with the three-term recurrence only.

    No reorthogonalisation and no convergence test: the vector work every
    Lanczos does per product (one dot, two axpys, a norm, a scaling, the
    basis kept for the Ritz vector), so its time beyond the products is the
    floor under any solver's overhead on the same products.  A baseline for
    timing, not a solver: its basis loses orthogonality as a Ritz value converges.
    """
    Q = torch.empty(steps + 1, dim, dtype=dtype, device=device)
    start = torch.randn(dim, dtype=dtype, device=device, generator=generator)
    torch.div(start, start.norm(), out=Q[0])
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(Q[j]).to(dtype)
        alpha = torch.dot(Q[j], w)
        w = torch.addcmul(w, Q[j], alpha, value=-1)
        if j:
            w.addcmul_(Q[j - 1], betas[-1], value=-1)
        beta = w.norm()
        torch.div(w, beta, out=Q[j + 1])
        alphas.append(alpha)
        betas.append(beta)
    theta, S = torch.linalg.eigh(tridiagonal(torch.stack(alphas), torch.stack(betas)[:-1]))
    return float(theta[-1]), Q[:steps].T @ S[:, -1]


def tracker_trial(model, chunks, snapshot, start: torch.Tensor, trial: int, *, seed: int, lr: float) -> dict:
    """One trial of ours: a run's first measure() (the method choice and the determinism probe inside
    it, "first"), a measure() from a random start again at the same parameters with that once-per-run
    work done ("cold"), the solver's own overhead ("overhead") and the floor under it ("floor", the same
    products in :func:`three_term_lanczos`), and two measure()s one GD step later:
    from the tracker's own previous eigenvector ("warm", as a run measures) and from ``start``, the
    vector the warm peers start from ("same"; the two alternate in order between trials).

    The trial starts a fresh :class:`~eos_toolkit.tracker.SharpnessTracker`
    (default ``tol``, ``k=1``, ``method="auto"``, seed ``seed + trial``)
    on the snapshot's parameters, takes its GD step at ``lr``, and leaves the model at the snapshot.
    """
    from eos_toolkit.tracker import SharpnessTracker
    from experiments.benchmarks.peers import PeerResult

    def row(metrics, seconds, what) -> PeerResult:
        stop = "residual < tol" if metrics["hessian_converged"] else "max_iter reached"
        return PeerResult("ours", metrics["sharpness"], int(metrics["hessian_matvecs"]), metrics["hessian_seconds"],
                          bool(metrics["hessian_converged"]), f"{stop}; {what}measure() {seconds:.2f} s")

    device = model_device(model)
    model.load_state_dict(snapshot)
    tracker = SharpnessTracker(model, nn.functional.mse_loss, chunks, k=1, seed=seed + trial)  # default tol
    metrics, seconds = timed(tracker.measure, device)
    out = {"first": row(metrics, seconds, f"chose {tracker.method_choice['method']}; ")}
    # Cold: the same parameters, from a random start again, with the once-per-run work done.
    saved, tracker.eigenvectors = tracker.eigenvectors, None
    out["cold"] = row(*timed(tracker.measure, device), "")
    tracker.eigenvectors = saved
    # The solver's own cost: a cold solve whose products are timed one by one.
    op, spent = tracker.hessian, []

    def timed_matvec(v):
        product, seconds = timed(lambda: op.matvec(v), device)
        spent.append(seconds)
        return product

    workspace = KrylovWorkspace()  # as in a tracker: the basis lives in a workspace an earlier solve has sized

    def solve(operator):
        return lanczos(operator, 1, tol=tracker.tol, max_iter=tracker.max_iter,
                       generator=torch.Generator(op.device).manual_seed(trial), workspace=workspace)

    timed_op = FunctionOperator(timed_matvec, op.dim, dtype=op.dtype, device=op.device)
    with op.measurement():
        solve(op)  # untimed, the same solve: reuse_graph's graphs and the workspace's rows exist
        result, total = timed(lambda: solve(timed_op), device)
        out["overhead"] = (total - sum(spent)) / sum(spent)
        # The floor under it: the same number of the same products in a Lanczos without reorthogonalisation.
        spent.clear()
        generator = torch.Generator(op.device).manual_seed(trial)
        _, total = timed(lambda: three_term_lanczos(timed_matvec, op.dim, result.n_matvecs, op.dtype,
                                                    op.device, generator), device)
        out["floor"] = (total - sum(spent)) / sum(spent)
    gd_step(model, chunks, lr)
    own = tracker.eigenvectors
    for which in ("warm", "same") if trial % 2 == 0 else ("same", "warm"):
        tracker.eigenvectors = own if which == "warm" else start.reshape(-1, 1).to(own)
        out[which] = row(*timed(tracker.measure, device), "")
    model.load_state_dict(snapshot)
    return out


def tracker_run(model, chunks, snapshot, *, seed: int, lr: float, steps: int) -> list[int]:
    """The products of each measurement of a short run: a tracker with its defaults (seed ``seed``) measures the
    snapshot, then again after each of ``steps`` GD steps at ``lr`` (every one after the first is warm, from its
    own vector)."""
    from eos_toolkit.tracker import SharpnessTracker

    model.load_state_dict(snapshot)
    tracker = SharpnessTracker(model, nn.functional.mse_loss, chunks, k=1, seed=seed)
    products = [int(tracker.measure()["hessian_matvecs"])]
    for _ in range(steps):
        gd_step(model, chunks, lr)
        products.append(int(tracker.measure()["hessian_matvecs"]))
    model.load_state_dict(snapshot)
    return products


def progress(name: str, stats: dict) -> dict:
    """Say on stderr that a row is done (the table comes at the end of the section); returns the row."""
    print(f"  .. {name}: {stats['products']:g} products, {stats['seconds']:.2f} s, error {stats['error']:.1e}",
          file=sys.stderr, flush=True)
    return stats


def peer_row(name: str, stats: dict, ratio: tuple[float, float]) -> str:
    products, seconds = ratio
    error = "-" if math.isnan(stats["error"]) else f"{stats['error']:.1e}"
    return (f"  {name:<34} {stats['products']:>8g} {stats['seconds']:>8.2f} {error:>10} "
            f"{stats['converged']:>5} {products:>9.2f} {seconds:>8.2f}  {stats['stop']}")


def print_peer_table(out, title: str, table: dict[str, dict], best: str | None) -> None:
    from experiments.benchmarks.peers import ratios

    rows = {name: (s["products"], s["seconds"], s["error"]) for name, s in table.items()}
    shares = ratios(rows, best)
    out.append(f"  {title}")
    out.append(f"  {'row':<34} {'products':>8} {'seconds':>8} {'rel.error':>10} {'conv':>5} "
               f"{'prod/best':>9} {'sec/best':>8}  stop")
    for name, stats in table.items():
        out.append(peer_row(name, stats, shares[name]))


def goal_lines(ours: dict, best_name: str | None, best: dict | None, label: str,
               peers_ran: bool = True) -> dict[str, bool | None]:
    """The products and seconds goals of one of our rows against the best accurate peer.

    "At equal or better accuracy" is read as: ours is within the same 1e-3
    relative error that qualified the peer (both errors are printed).  A
    goal without a peer to compare with is ``None`` (SKIP) when no peer is
    installed, ``False`` (FAIL) when peers ran and none was accurate.
    """
    if not peers_ran:
        return {f"{label}: no peer library is installed, nothing to compare with": None}
    if best is None:
        return {f"{label}: no peer reached {REL_TARGET:g} relative error, nothing to compare with": False}
    accurate = ours["error"] <= REL_TARGET
    accuracy = f"error {ours['error']:.1e} vs {best['error']:.1e}"
    products = ours["products"] / best["products"]
    seconds = ours["seconds"] / best["seconds"]
    return {
        f"{label} products <= 0.8 x {best_name} ({ours['products']:g} vs {best['products']:g} = {products:.2f}x; "
        f"{accuracy})": accurate and products <= 0.8,
        f"{label} seconds <= 0.7 x {best_name} ({ours['seconds']:.2f} vs {best['seconds']:.2f} = {seconds:.2f}x; "
        f"{accuracy})": accurate and seconds <= 0.7,
    }


def peer_table(title: str, model, chunks, settings: PeerSettings) -> dict[str, bool | None]:
    """The peer section for one config: reference, each peer cold (and warm where it takes a start), ours cold and warm.

    Returns the goals it printed (True PASS, False FAIL, None SKIP).
    """
    from eos_toolkit.tracker import SharpnessTracker
    from experiments.benchmarks.peers import PEERS, best_accurate, peer_availability

    out = Printer()
    out.append(f"== peers: {title}, {settings.trials} trial(s) (medians) ==")
    loss = nn.functional.mse_loss
    snapshot = copy.deepcopy(model.state_dict())
    reference, ref_vector, text = reference_eigen(model, chunks, seed=settings.seed, max_iter=settings.reference_iter)
    out.append(f"  reference {text}")
    gd_step(model, chunks, settings.lr)
    after, _, text = reference_eigen(model, chunks, seed=settings.seed, max_iter=settings.reference_iter,
                                     v0=ref_vector)
    out.append(f"  one GD step later: reference {text}")
    model.load_state_dict(snapshot)
    start = ref_vector.to(next(model.parameters()).dtype)

    available = peer_availability()
    present = []
    for peer in PEERS.values():
        if available[peer.name] is not None:
            out.append(f"  {peer.label}: skipped: {available[peer.name]}")
            continue
        present.append(peer)
        # Untimed warm-up, two products on the same data: first-call costs (allocations at these shapes,
        # torch.func set-up, ARPACK) stay out of the rows, as our reference run keeps them out of ours.
        peer.run(model, loss, chunks, tol=REL_TARGET, max_iter=2, seed=settings.seed)
    cold_runs: dict[str, list] = {}
    warm_runs: dict[str, list] = {}
    ours_runs: dict[str, list] = {}
    for trial in range(settings.trials):
        # Trial by trial, every row in turn: a slow spell of a shared machine falls on all rows alike.
        for peer in present:
            for tol in settings.tols:
                cold_runs.setdefault(f"{peer.label} (tol {tol:g})", []).append(
                    peer.run(model, loss, chunks, tol=tol, max_iter=settings.max_iter, seed=settings.seed + trial))
                if peer.takes_start:
                    gd_step(model, chunks, settings.lr)
                    warm_runs.setdefault(f"{peer.label} warm (tol {tol:g})", []).append(
                        peer.run(model, loss, chunks, tol=tol, max_iter=settings.max_iter, seed=settings.seed,
                                 v0=start))
                    model.load_state_dict(snapshot)
        for key, value in tracker_trial(model, chunks, snapshot, start, trial, seed=settings.seed,
                                        lr=settings.lr).items():
            ours_runs.setdefault(key, []).append(value)
        print(f"  .. trial {trial + 1} of {settings.trials} done", file=sys.stderr, flush=True)
    cold = {name: progress(name, summarize(runs, reference)) for name, runs in cold_runs.items()}
    warm = {name: progress(name, summarize(runs, after)) for name, runs in warm_runs.items()}
    overheads = ours_runs["overhead"]
    ours_text = (f"SharpnessTracker(k=1, tol={inspect.signature(SharpnessTracker).parameters['tol'].default:g}, "
                 "method='auto')")
    peer_rows = {name: (s["products"], s["seconds"], s["error"]) for name, s in cold.items()}
    best = best_accurate(peer_rows, REL_TARGET)
    table = dict(cold)
    table["ours cold"] = summarize(ours_runs["cold"], reference)
    table["ours first of a run"] = summarize(ours_runs["first"], reference)
    print_peer_table(out, "cold: each solver from a random start", table, best)
    out.append(f"  ours: {ours_text}; products and seconds are its hessian_matvecs and hessian_seconds; "
               "'cold' is a measurement from a random start, 'first of a run' the same measurement with the "
               "once-per-run work inside it (timing the product rules, the determinism check)")
    if not cold:
        out.append("  best accurate peer: none (no peer library installed)")
    elif best is None:
        out.append(f"  best accurate peer: none (no peer run within {REL_TARGET:g} relative error)")
    else:
        out.append(f"  best accurate peer: {best} (the fastest peer run within {REL_TARGET:g} relative error)")
    # Warm: one GD step later, every solver that takes a start vector starts from the same one.
    warm_rows = {name: (s["products"], s["seconds"], s["error"]) for name, s in warm.items()}
    best_warm = best_accurate(warm_rows, REL_TARGET) if warm else None
    warm_table = dict(warm)
    warm_table[SAME_START] = summarize(ours_runs["same"], after)
    warm_table[OWN_START] = summarize(ours_runs["warm"], after)
    print_peer_table(out, "warm, one GD step later: the peers that take a start vector and ours start from the same "
                     "vector, the previous reference eigenvector (ratios to the best accurate peer among them)",
                     warm_table, best_warm)
    out.append(f"  '{OWN_START}': the tracker's next measure() as a run makes it, from the eigenvector of its own "
               "previous measurement (tol-accurate, not the reference)")
    best_stats = cold.get(best) if best else None
    verdict = goal_lines(table["ours cold"], best, best_stats, "ours cold", peers_ran=bool(cold))
    verdict.update(goal_lines(table["ours first of a run"], best, best_stats, "ours first of a run",
                              peers_ran=bool(cold)))
    # Warm against warm, from the same start; against the cold best only where no installed peer takes a start.
    if warm or not cold:
        verdict.update(goal_lines(warm_table[SAME_START], best_warm, warm.get(best_warm), "ours warm, same start",
                                  peers_ran=bool(cold)))
    else:
        verdict.update(goal_lines(warm_table[SAME_START], best, best_stats,
                                  "ours warm (no installed peer takes a start vector: against the cold best)"))
    warm_products = warm_table[OWN_START]["products"]
    verdict[f"ours warm from its own previous vector <= 5 products ({warm_products:g})"] = warm_products <= 5
    if settings.warm_steps:
        run = tracker_run(model, chunks, snapshot, seed=settings.seed, lr=settings.lr, steps=settings.warm_steps)
        out.append(f"  a run measuring every step ({settings.warm_steps} GD steps at lr {settings.lr}): products per "
                   f"measurement {run} (the first from a random start, the method choice inside it)")
        verdict[f"ours warm during a run <= 5 products per measurement (max {max(run[1:])} over "
                f"{settings.warm_steps})"] = max(run[1:]) <= 5
    overhead, floor = statistics.median(overheads), statistics.median(ours_runs["floor"])
    verdict[f"solver overhead < 10% of the products' time ({100 * overhead:.1f}%, Lanczos with timed products; "
            f"the floor, the same products in a three-term Lanczos without reorthogonalisation: "
            f"{100 * floor:.1f}%)"] = overhead < 0.10
    out += verdict_lines("goal", verdict)
    return verdict


def peer_header() -> str:
    """One line: each peer's installed version, or why it is skipped."""
    from experiments.benchmarks.peers import PEERS, peer_availability, peer_versions

    available, versions = peer_availability(), peer_versions()
    parts = [f"{peer.label} {versions[name]}" if available[name] is None else f"{peer.label} not importable"
             for name, peer in PEERS.items()]
    return "peers: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="which sections to run (default: all)")
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None,
                        help=f"models and GD steps: {', '.join(CONFIGS)} or MODEL:STEPS "
                             f"(default: {' '.join(CONFIGS)})")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS,
                        help="shorthand for --configs MODEL:STEPS with --pretrain-steps")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="GD steps before measuring, with --models (default 20)")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1000, help="examples per HVP chunk")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the data layer's search)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    parser.add_argument("--lr", type=float, default=0.05, help="gradient-descent rate for the warm-up steps")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per HVP method")
    parser.add_argument("--max-iter", type=int, default=200, help="Lanczos product budget")
    parser.add_argument("--power-iter", type=int, default=100, help="power-iteration product budget")
    parser.add_argument("--trials", type=int, default=3, help="random starts per cold solver (medians)")
    parser.add_argument("--peer-tols", nargs="+", type=float, default=[1e-3, 1e-4],
                        help="the tol given to each peer's own stopping rule (one row per value)")
    parser.add_argument("--peer-max-iter", type=int, default=100, help="each peer's product budget")
    parser.add_argument("--peer-trials", type=int, default=1, help="random starts per peer row and for ours (medians)")
    parser.add_argument("--reference-iter", type=int, default=300, help="product budget of the tight reference")
    parser.add_argument("--warm-steps", type=int, default=10,
                        help="peers section: GD steps of a run that measures after each (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.configs is not None and (args.models is not None or args.pretrain_steps is not None):
        parser.error("give either --configs or --models/--pretrain-steps, not both")
    if args.models is not None or args.pretrain_steps is not None:
        steps = 20 if args.pretrain_steps is None else args.pretrain_steps
        if steps < 0:
            parser.error(f"--pretrain-steps must be >= 0, got {steps}")
        args.configs = [parse_config(f"{m}:{steps}") for m in (args.models or MODELS)]
    configs = args.configs or [parse_config(c) for c in CONFIGS]
    for flag in ("n_examples", "chunk_size", "repeats", "max_iter", "power_iter", "trials", "peer_max_iter",
                 "peer_trials", "reference_iter"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warm_steps < 0:
        parser.error(f"--warm-steps must be >= 0, got {args.warm_steps}")
    if any(not (math.isfinite(t) and t >= 0) for t in args.peer_tols):
        parser.error(f"--peer-tols must be finite numbers >= 0, got {args.peer_tols}")
    if args.threads:
        torch.set_num_threads(args.threads)
    runners = {
        "hvp": functools.partial(hvp_section, repeats=args.repeats),
        "solvers": functools.partial(solver_section, settings=SolverSettings(
            seed=args.seed, lr=args.lr, max_iter=args.max_iter, power_iter=args.power_iter, trials=args.trials)),
        "peers": functools.partial(peer_table, settings=PeerSettings(
            seed=args.seed, lr=args.lr, tols=tuple(args.peer_tols), max_iter=args.peer_max_iter,
            trials=args.peer_trials, reference_iter=args.reference_iter, warm_steps=args.warm_steps)),
    }
    device = torch.device(args.device)
    images, targets, source = load_subset(args.n_examples, args.data_dir, device)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; data: {source}")
    if "peers" in args.sections:
        print(peer_header())
    chunks = task_base.chunks(images, targets, args.chunk_size)
    for config in configs:
        _, name, steps = config
        model = trained_model(name, steps, chunks, seed=args.seed, lr=args.lr, device=device)
        title = describe(config, model, chunks, args.lr)
        snapshot = copy.deepcopy(model.state_dict())
        for section in args.sections:
            model.load_state_dict(snapshot)
            runners[section](title, model, chunks)


if __name__ == "__main__":
    main()
