"""Synthetic run records with the shape of real edge-of-stability runs.

Written with :class:`eos_toolkit.record.RunWriter`, so they are exactly what the
training loop leaves behind. The curves are made up but follow the known
phenomenology: gradient descent sharpens until lambda_1 reaches 2/lr and then
hovers there while the loss keeps falling non-monotonically; Adam's
preconditioned sharpness sits at 38/lr; VRAdam's gate damps eta_t early (clamp
active) and its preconditioned sharpness settles between 38/lr and 38/eta_t; a
too-large rate diverges; a killed run leaves a partial line.

``python -m tests.analysis.fixtures OUT_DIR`` writes the set to OUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from eos_toolkit.record import EVENTS_FILE, METRICS_FILE, RunWriter

ENVIRONMENT = {"python": "3.11", "torch": "2.13.0", "device": "cpu", "git_commit": "0000000"}


def _config(optimizer: str, lr: float, seed: int, steps: int, track_every: int, **extra) -> dict:
    return {"task": "eos_mlp", "model": "mlp_tanh", "dataset": "fashion_mnist_1k", "optimizer": optimizer,
            "lr": lr, "seed": seed, "steps": steps, "track_every": track_every, **extra}


def _sharpening(t: np.ndarray, start: float, edge: float, reach: float, rng, wobble: float = 0.03) -> np.ndarray:
    """Progressive sharpening from ``start`` to ``edge`` by step ``reach``, then hovering at the edge."""
    rise = start + (edge - start) * np.clip(t / reach, 0, 1) ** 1.5
    hover = edge * (1 + wobble * np.sin(t / 7.0) + 0.5 * wobble * rng.standard_normal(len(t)))
    return np.where(t < reach, rise * (1 + 0.01 * rng.standard_normal(len(t))), hover)


def _loss(t: np.ndarray, edge_step: float, rng, floor: float = 0.05, tau: float = 120.0) -> np.ndarray:
    """Smooth decay before the edge; after it, still falling on average but rising every few steps."""
    base = floor + 0.45 * np.exp(-t / tau)
    osc = np.where(t >= edge_step, 0.15 * base * (np.arange(len(t)) % 2) * (1 + rng.random(len(t))), 0.0)
    return base * (1 + 0.002 * rng.standard_normal(len(t))) + osc


def write_gd(root: Path, lr: float, seed: int, steps: int = 400, track_every: int = 10, momentum: float = 0.0,
             density: bool = False, label: bool = True) -> Path:
    rng = np.random.default_rng(seed + int(1000 * lr))
    optimizer = "momentum" if momentum else "gd"
    edge = 2 * (1 + momentum) / ((1 - momentum) * lr)
    extra = {"momentum": momentum} if momentum else {}
    config = _config(optimizer, lr, seed, steps, track_every, **extra)
    if label:
        config["label"] = f"{'Momentum' if momentum else 'GD'} lr={lr:g}"
    name = f"{optimizer}_lr{lr:g}_s{seed}"
    w = RunWriter.create(root / name, config=config, environment=ENVIRONMENT)
    w.event("started", step=0)
    t = np.arange(steps)
    reach = min(0.4 * steps, 4.0 / lr)
    loss = _loss(t, reach, rng)
    at_edge = t >= reach
    proj = np.where(at_edge, (-1.0) ** t, 1.0) * np.exp(-t / 400) * 0.1
    cos = np.where(at_edge, -0.4 + 0.1 * rng.standard_normal(steps), 0.95)
    rows = []
    for s in t:
        rows += [(s, "train_loss", loss[s]), (s, "lr", lr), (s, "eta", lr), (s, "update_norm", abs(proj[s]) * 3),
                 (s, "update_cos", cos[s]), (s, "update_proj_top", proj[s])]
    tracked = t[::track_every]
    sharp = _sharpening(tracked.astype(float), 0.15 * edge, edge, reach, rng)
    for s, lam in zip(tracked, sharp):
        rows += [(s, "sharpness", lam), (s, "threshold", edge), (s, "hessian_eig_1", lam),
                 (s, "hessian_eig_2", 0.55 * lam * (1 + 0.05 * np.sin(s / 30))), (s, "hessian_eig_3", 0.35 * lam),
                 (s, "track_loss", loss[s] * 1.02), (s, "track_acc", 0.6 + 0.3 * (1 - np.exp(-s / 150)))]
    w.log_metrics(rows)
    if density:
        grid = np.linspace(-0.1 * edge, 1.2 * edge, 120)
        for s, lam in zip(tracked[:: max(1, len(tracked) // 8)], sharp[:: max(1, len(tracked) // 8)]):
            bulk = np.exp(-0.5 * (grid / (0.02 * edge)) ** 2)
            outliers = sum(np.exp(-0.5 * ((grid - c * lam) / (0.02 * edge)) ** 2) * 0.02 for c in (1.0, 0.55, 0.35))
            d = (bulk + outliers) / np.trapezoid(bulk + outliers, grid)
            w.log_density(s, grid, d)
    w.event("finished", step=steps - 1)
    return root / name


def write_adam(root: Path, lr: float, seed: int, steps: int = 400, track_every: int = 10, vradam: bool = False,
               beta3: float = 1.0, alpha1: float = 4.0) -> Path:
    rng = np.random.default_rng(seed + 7 + int(vradam))
    optimizer = "vradam" if vradam else "adam"
    extra = {"betas": [0.9, 0.999], "eps": 1e-8}
    if vradam:
        extra["vradam"] = {"beta3": beta3, "alpha1": alpha1, "power": 2}
    config = _config(optimizer, lr, seed, steps, track_every, **extra)
    config["label"] = f"{'VRAdam' if vradam else 'Adam'} lr={lr:g}"  # as a run writes it
    name = f"{optimizer}_lr{lr:g}_s{seed}"
    w = RunWriter.create(root / name, config=config, environment=ENVIRONMENT)
    w.event("started", step=0)
    t = np.arange(steps)
    # Velocity norm: large while the loss falls fast, small later; the gate clamps early.
    sq = 30.0 * np.exp(-t / 40) + 0.4 + 0.3 * np.abs(np.sin(t / 5.0)) + 0.05 * rng.random(steps)
    eta = lr / (1 + np.minimum(beta3 * sq, alpha1)) if vradam else np.full(steps, lr)
    clamped = (beta3 * sq >= alpha1).astype(float)
    loss = _loss(t, 0.25 * steps, rng, floor=0.02, tau=80.0 if vradam else 60.0)
    rows = []
    for s in t:
        rows += [(s, "train_loss", loss[s]), (s, "lr", lr), (s, "eta", eta[s]),
                 (s, "update_cos", 0.3 + 0.2 * rng.standard_normal()),
                 (s, "update_proj_top", rng.standard_normal() * 0.01)]
        if vradam:
            rows += [(s, "vr_sq_norm", sq[s]), (s, "vr_clamped", clamped[s])]
    edge = 38.0 / lr
    tracked = t[::track_every]
    if vradam:
        edge_eta = 38.0 / eta[tracked]
        target = 0.5 * (edge + edge_eta)  # settles inside the band
        sharp = np.minimum(0.1 * edge + edge * (tracked / (0.3 * steps)) ** 1.5, target)
        sharp = sharp * (1 + 0.02 * rng.standard_normal(len(tracked)))
    else:
        sharp = _sharpening(tracked.astype(float), 0.1 * edge, edge, 0.25 * steps, rng)
    for j, s in enumerate(tracked):
        rows += [(s, "precond_sharpness", sharp[j]), (s, "precond_threshold", edge),
                 (s, "sharpness", 5.0 + 20 * (1 - np.exp(-s / 100))), (s, "track_loss", loss[s] * 1.02),
                 (s, "track_acc", 0.65 + 0.3 * (1 - np.exp(-s / 120)))]
        if vradam:
            rows.append((s, "precond_threshold_eta", float(edge_eta[j])))
    w.log_metrics(rows)
    w.event("finished", step=steps - 1)
    return root / name


def write_diverged(root: Path, lr: float = 0.5, steps: int = 60) -> Path:
    name = f"gd_lr{lr:g}_diverged"
    w = RunWriter.create(root / name, config=_config("gd", lr, 0, 400, 10, label=f"GD lr={lr:g}"),
                         environment=ENVIRONMENT)
    w.event("started", step=0)
    rows = []
    for s in range(steps):
        loss = 0.5 * 1.25**s if s < steps - 1 else float("inf")
        rows += [(s, "train_loss", loss), (s, "lr", lr), (s, "eta", lr), (s, "update_proj_top", (-1.0) ** s)]
        if s % 10 == 0:
            rows += [(s, "sharpness", 3.0 + 0.6 * s), (s, "threshold", 2 / lr)]
    rows.append((steps - 1, "sharpness", float("nan")))
    w.log_metrics(rows)
    w.event("diverged", step=steps - 1, reason="loss is inf")
    return root / name


def write_killed(root: Path, lr: float = 0.05, steps: int = 50) -> Path:
    """A run killed mid-write: no terminal event, partial last lines in metrics and events."""
    name = f"gd_lr{lr:g}_killed"
    w = RunWriter.create(root / name, config=_config("gd", lr, 9, 400, 10, label=f"GD lr={lr:g}"),
                         environment=ENVIRONMENT)
    w.event("started", step=0)
    w.log_metrics([(s, "train_loss", 0.5 * 0.99**s) for s in range(steps)])
    with open(w.run_dir / METRICS_FILE, "a") as f:
        f.write(f"{steps},train_lo")
    with open(w.run_dir / EVENTS_FILE, "a") as f:
        f.write('{"time": "2026-01-01T00:00:00+00:00", "eve')
    return root / name


def write_fixture_runs(root: str | Path, steps: int = 400, seeds: int = 3) -> dict[str, Path]:
    """The whole set: GD at two rates with seeds, momentum, Adam, VRAdam, a diverged and a killed run."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in range(seeds):
        runs[f"gd0.05_s{seed}"] = write_gd(root, 0.05, seed, steps, density=seed == 0)
        runs[f"gd0.02_s{seed}"] = write_gd(root, 0.02, seed, steps, label=False)
        runs[f"adam_s{seed}"] = write_adam(root, 0.002, seed, steps)
        runs[f"vradam_s{seed}"] = write_adam(root, 0.002, seed, steps, vradam=True)
    runs["momentum"] = write_gd(root, 0.01, 0, steps, momentum=0.9)
    runs["diverged"] = write_diverged(root)
    runs["killed"] = write_killed(root)
    return runs


if __name__ == "__main__":
    for key, path in write_fixture_runs(sys.argv[1]).items():
        print(key, path)
