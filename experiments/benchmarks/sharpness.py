"""Benchmark the curvature engine on real data: HVP cost and the cost of the top eigenvalue.

For the edge-of-stability MLP (784-200-200-10, tanh) and a small CNN (two
3x3 convolutions, tanh), trained a few full-batch gradient-descent steps on a
class-balanced Fashion-MNIST subset with MSE on one-hot targets, it prints:

* the wall time of one Hessian-vector product per method, as a ratio to one
  full-batch gradient (medians over interleaved repeats);
* for the top Hessian eigenvalue, the products and seconds each solver takes:
  our Lanczos (cold, and warm-started after one training step), our power
  iteration, ``scipy.sparse.linalg.eigsh`` with ``tol=0`` (the setting of the
  classic edge-of-stability code) and with ``tol=1e-3``, and PyHessian's power
  iteration when ``pyhessian`` is installed.  "to 1e-3" is the first product
  after which the solver's estimate is within 1e-3 (relative) of a tight
  reference (Lanczos, residual 1e-10): an oracle count; "stop" is where the
  solver's own rule stopped, with the error it had there.

Targets checked at the end: HVP (forward-over-reverse) <= 4 gradients on the
CPU; cold Lanczos (own stop, tol 1e-3) <= 1/3 of eigsh(tol=0)'s products;
warm start after one step <= 5 products.

    python -m experiments.benchmarks.sharpness --n-examples 1000 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from eos_toolkit.hvp import METHODS, hessian_operator
from eos_toolkit.operators import as_scipy_linear_operator
from eos_toolkit.solvers import lanczos, power_iteration

REL_TARGET = 1e-3


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


def chunks_of(images, targets, size: int):
    return [(images[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


def gd_step(model: nn.Module, chunks, lr: float) -> None:
    """One full-batch gradient-descent step on the size-weighted mean MSE."""
    n = sum(len(t) for _, t in chunks)
    model.zero_grad()
    for x, y in chunks:
        (nn.functional.mse_loss(model(x), y) * (len(y) / n)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def full_gradient(model: nn.Module, chunks) -> None:
    n = sum(len(t) for _, t in chunks)
    params = list(model.parameters())
    for x, y in chunks:
        torch.autograd.grad(nn.functional.mse_loss(model(x), y) * (len(y) / n), params)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing only


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def hvp_ratios(model, chunks, device, repeats: int) -> dict[str, float]:
    """Median HVP time / median gradient time, interleaving the contenders."""
    ops = {m: hessian_operator(model, nn.functional.mse_loss, chunks, method=m) for m in METHODS}
    v = torch.randn(ops[METHODS[0]].dim, device=device)
    contenders = {"gradient": lambda: full_gradient(model, chunks)}
    contenders.update({m: (lambda op=op: op.matvec(v)) for m, op in ops.items()})
    for fn in contenders.values():
        fn()  # warm-up
    times = {name: [] for name in contenders}
    model.eval()
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    grad_time = statistics.median(times["gradient"])
    return {"gradient_seconds": grad_time,
            **{m: statistics.median(times[m]) / grad_time for m in METHODS}}


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


def solver_table(op, reference: float, args, lines: list[str]) -> dict[str, float]:
    """Rows of products, oracle products, error and time per solver (medians over ``args.trials`` starts)."""
    from scipy.sparse.linalg import eigsh

    lines += [f"  {'solver (median of %d starts)' % args.trials:<34} {'stop':>6} {'to 1e-3':>9} "
             f"{'rel. error':>11} {'seconds':>9}"]
    counts: dict[str, float] = {}
    for criterion in ("residual", "eigenvalue"):
        runs = []
        for trial in range(args.trials):
            generator = torch.Generator(device=op.device).manual_seed(args.seed + trial)
            box = {}
            seconds = timed(lambda: box.setdefault("r", lanczos(
                op.matvec, op.dim, 1, tol=REL_TARGET, max_iter=args.max_iter, criterion=criterion,
                dtype=op.dtype, device=op.device, generator=generator, keep_history=True)), op.device)
            res = box["r"]
            error = abs(float(res.eigenvalues[0]) - reference) / abs(reference)
            runs.append((res.n_matvecs, first_within(res.history, reference), error, seconds))
        counts[f"lanczos_{criterion}"] = statistics.median(r[0] for r in runs)
        counts["lanczos_oracle"] = statistics.median(r[1] or args.max_iter for r in runs)
        lines.append(median_row(f"lanczos cold ({criterion} 1e-3)", runs))
    generator = torch.Generator(device=op.device).manual_seed(args.seed)
    box = {}
    seconds = timed(lambda: box.setdefault("r", power_iteration(
        op.matvec, op.dim, tol=0.0, max_iter=args.power_iter, check_every=args.power_iter,
        dtype=op.dtype, device=op.device, generator=generator, keep_history=True)), op.device)
    history = box["r"].history
    stop = power_stop(history, REL_TARGET)
    error = abs(float(history[stop - 1]) - reference) / abs(reference)
    lines.append(row("power iteration (change 1e-3)", stop, first_within(history, reference), error,
                     seconds * stop / len(history)))
    for tol in (0.0, REL_TARGET):
        runs = []
        for trial in range(args.trials):
            start = torch.randn(op.dim, generator=torch.Generator().manual_seed(args.seed + trial),
                                dtype=torch.float64).numpy()
            before = op.n_matvecs
            box = {}
            seconds = timed(lambda: box.setdefault("v", eigsh(
                as_scipy_linear_operator(op), k=1, which="LA", tol=tol, v0=start,
                return_eigenvectors=False)), op.device)
            error = abs(float(box["v"][0]) - reference) / abs(reference)
            runs.append((op.n_matvecs - before, 0, error, seconds))
        counts[f"eigsh_tol{tol:g}"] = statistics.median(r[0] for r in runs)
        lines.append(median_row(f"scipy eigsh (tol={tol:g})", runs).replace("        0 ", "        - "))
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        lines.append("  pyhessian: not installed, skipped (optional; pip install pyhessian to compare)")
    else:
        lines.append("  pyhessian: installed, but not run: its power iteration wants its own"
                     " model/data wrapper; the power-iteration row uses its stopping rule")
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


def bench_model(name: str, args, device: torch.device, images, targets) -> list[str]:
    torch.manual_seed(args.seed)
    model = build(name, args.seed, device)
    chunks = chunks_of(images, targets, args.chunk_size)
    for _ in range(args.pretrain_steps):
        gd_step(model, chunks, args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    out = Printer()
    out.append(f"== {name}: {n_params:,} parameters, {len(targets)} examples in {len(chunks)} chunk(s), "
               f"after {args.pretrain_steps} GD steps at lr {args.lr} ==")
    ratios = hvp_ratios(model, chunks, device, args.repeats)
    out.append(f"  gradient: {ratios['gradient_seconds'] * 1e3:.1f} ms (median of {args.repeats})")
    out += [f"  HVP {m:<22} {ratios[m]:5.2f} x gradient" for m in METHODS]
    op = hessian_operator(model, nn.functional.mse_loss, chunks, dtype=torch.float64)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tight = lanczos(op.matvec, op.dim, 1, tol=1e-10, max_iter=400, dtype=op.dtype, device=device,
                    generator=generator)
    reference = float(tight.eigenvalues[0])
    out.append(f"  reference lambda_1 = {reference:.6f} (Lanczos, residual {float(tight.residuals[0]):.1e}, "
               f"{tight.n_matvecs} products)")
    counts = solver_table(op, reference, args, out)
    # Warm start: one training step later, start from the previous top eigenvector.
    previous = tight.eigenvectors
    gd_step(model, chunks, args.lr)
    new_reference = float(lanczos(op.matvec, op.dim, 1, tol=1e-10, max_iter=400, v0=previous, dtype=op.dtype,
                                  device=device, generator=generator).eigenvalues[0])
    out.append(f"  one GD step later: lambda_1 = {new_reference:.6f}")
    warm_counts = {}
    for criterion in ("residual", "eigenvalue"):
        box = {}
        seconds = timed(lambda: box.setdefault("r", lanczos(
            op.matvec, op.dim, 1, tol=REL_TARGET, max_iter=args.max_iter, v0=previous, criterion=criterion,
            dtype=op.dtype, device=device, generator=generator, keep_history=True)), device)
        warm = box["r"]
        warm_counts[criterion] = warm.n_matvecs
        error = abs(float(warm.eigenvalues[0]) - new_reference) / abs(new_reference)
        out.append(row(f"lanczos warm ({criterion} 1e-3)", warm.n_matvecs,
                       first_within(warm.history, new_reference), error, seconds))
    eigsh_products = counts["eigsh_tol0"]
    verdict = {
        f"HVP forward-over-reverse <= 4 x gradient ({ratios['forward_over_reverse']:.2f})":
            ratios["forward_over_reverse"] <= 4.0,
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
    out += [f"  target {'PASS' if ok else 'FAIL'}: {text}" for text, ok in verdict.items()]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1000, help="examples per HVP chunk")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the data layer's search)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    parser.add_argument("--lr", type=float, default=0.05, help="gradient-descent rate for the warm-up steps")
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per HVP method")
    parser.add_argument("--max-iter", type=int, default=200, help="Lanczos product budget")
    parser.add_argument("--power-iter", type=int, default=100, help="power-iteration product budget")
    parser.add_argument("--trials", type=int, default=3, help="random starts per cold solver (medians)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, targets, source = load_subset(args.n_examples, args.data_dir, device)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; data: {source}")
    for name in args.models:
        bench_model(name, args, device, images, targets)


if __name__ == "__main__":
    main()
