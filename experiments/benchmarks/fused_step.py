"""Time the fused (Triton) VRAdam step against torch's fused AdamW, on CUDA.

One run prints, for a GPT-2-small-shaped float32 parameter set (148 tensors,
124.4 M values at ``--scale 1``):

1. checks: the fused step equals the foreach path over a few steps (float32
   tolerance), runs under ``torch.cuda.set_sync_debug_mode("error")``, and
   replays correctly from a CUDA graph;
2. a small sweep of launch shapes (chunk, block, warps) of the fused step;
3. the table: median step time of torch AdamW (fused, foreach), VRAdam fused
   (the optimizer class; the bare functional step at the sweep's best shape;
   the same replayed from a CUDA graph; the lagged one-pass variant), VRAdam
   foreach and the per-tensor-sync VRAdam in the public code's style, each as
   a ratio to torch fused AdamW and as a speed-up over the per-tensor-sync
   style, with the achieved bandwidth (the bytes the algorithm must move /
   time) against the device's copy bandwidth measured in the same run.

Bytes per float32 parameter: AdamW 28 (read p, g, m, v; write p, m, v); exact
VRAdam 36 (two passes: read g, v, m, write v, m; read p, v, m, write p); the
lagged variant 28. ``floor`` = bytes / copy bandwidth.

    python -m experiments.benchmarks.fused_step              # on a CUDA machine
    TRITON_INTERPRET=1 python -m experiments.benchmarks.fused_step --device cpu
        # without a GPU: the same script on tiny shapes through Triton's
        # interpreter (checks and a table whose times mean nothing)

Without CUDA (and without the interpreter) it says so and exits 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from experiments.benchmarks.optimizer_step import NaiveSyncVRAdam, gpt2_small_shapes
from experiments.benchmarks.timing import interleaved_medians
from vradam import VRAdam, fused_triton
from vradam.functional import GroupTensors, vradam_step

BYTES_PER_VALUE = {"adamw": 28, "vradam_exact": 36, "vradam_lagged": 28}
SWEEP = [
    fused_triton.FusedConfig(chunk, block, warps)
    for chunk, block, warps in (
        (4096, 1024, 4), (8192, 1024, 4), (16384, 1024, 4), (65536, 1024, 4),
        (8192, 2048, 8), (16384, 2048, 8), (65536, 4096, 8), (16384, 512, 4),
    )
]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=10.0, eps=1e-8,
             weight_decay=1e-2)
INTERPRETED_CONFIG = fused_triton.FusedConfig(4096, 512, 1)  # few programs: the interpreter is slow
OPTIONS = dict(gate="velocity", power=2.0, norm_scope="global")


# ------------------------------------------------------------------ timing


def _per_batch(device: torch.device) -> int:
    return 5 if device.type == "cuda" else 1


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (a read and a write of nbytes each)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, per_batch=5,
                                  repeats=repeats, warmup=2)["copy"]
    return 2 * nbytes / seconds


# ------------------------------------------------------------ parameters


@dataclass
class ParamSet:
    """Initial values and fixed gradients; each contender steps its own copy."""

    initial: list[torch.Tensor]
    grads: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.initial)

    def params(self) -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(t.clone()) for t in self.initial]
        for p, g in zip(params, self.grads):
            p.grad = g  # shared and read-only
        return params

    def groups(self) -> list[GroupTensors]:
        """One functional-core group with step counts on the device (capturable)."""
        params = [t.clone() for t in self.initial]
        return [GroupTensors(
            params=params, grads=list(self.grads),
            exp_avgs=[torch.zeros_like(p) for p in params],
            exp_avg_sqs=[torch.zeros_like(p) for p in params],
            steps=[torch.zeros((), device=p.device) for p in params], **HYPER,
        )]


def make_param_set(shapes, device: torch.device, seed: int = 0) -> ParamSet:
    gen = torch.Generator().manual_seed(seed)
    initial = [(torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
    return ParamSet(initial, grads)


# ---------------------------------------------------------------- checks


def check(param_set: ParamSet, device: torch.device, steps: int = 3) -> list[str]:
    """Fused vs foreach over a few steps; no sync; graph capture and replay."""
    fused, foreach = param_set.groups(), param_set.groups()
    lines = []
    for _ in range(steps):
        (tel,) = fused_triton.fused_step(fused, **OPTIONS)
        (ref,) = vradam_step(foreach, **OPTIONS, impl="foreach")
    worst = max(  # normwise: the largest difference over the largest value, per tensor
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(fused[0].params + fused[0].exp_avgs + fused[0].exp_avg_sqs,
                        foreach[0].params + foreach[0].exp_avgs + foreach[0].exp_avg_sqs)
        if a.numel()
    )
    eta_error = abs(float(tel.eta) / float(ref.eta) - 1)
    status = "ok" if worst < 1e-5 and eta_error < 1e-5 else "MISMATCH"
    lines.append(f"fused vs foreach after {steps} steps: largest normwise relative error "
                 f"{worst:.2e}, eta relative error {eta_error:.2e}: {status}")
    if device.type != "cuda":
        return lines

    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_triton.fused_step(fused, **OPTIONS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)  # deliberate: the step's kernels ran (an error of theirs surfaces here)
    lines.append("no host-device sync in the fused step (sync debug mode 'error'): ok")
    vradam_step(foreach, **OPTIONS, impl="foreach")

    graph = capture_step(lambda: fused_triton.fused_step(fused, **OPTIONS), device)
    vradam_step(foreach, **OPTIONS, impl="foreach")  # the twin of the capture's warm-up step
    for _ in range(2):
        graph.replay()
        vradam_step(foreach, **OPTIONS, impl="foreach")
    torch.cuda.synchronize(device)  # deliberate: the replays finished before they are compared
    ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7)
             for a, b in zip(fused[0].params, foreach[0].params))
    lines.append(f"CUDA graph capture + 2 replays vs foreach: {'ok' if ok else 'MISMATCH'}")
    return lines


def capture_step(step: Callable[[], object], device: torch.device) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (builds the chunk tables), then capture one step."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


# ----------------------------------------------------------------- sweep


def sweep(param_set: ParamSet, device: torch.device, repeats: int) -> list[tuple]:
    """(config, seconds per step) for each launch shape of the functional fused step."""
    configs = SWEEP if device.type == "cuda" else [INTERPRETED_CONFIG]
    steps = {}
    for config in configs:
        groups = param_set.groups()
        steps[config] = lambda g=groups, c=config: fused_triton.fused_step(g, **OPTIONS, config=c)
    timings = interleaved_medians(steps, device, per_batch=_per_batch(device), repeats=repeats,
                                  warmup=1)
    return sorted(timings.items(), key=lambda item: item[1])


# ----------------------------------------------------------------- table


def contenders(param_set: ParamSet, device: torch.device, best: fused_triton.FusedConfig):
    """name -> (step callable, bytes per value moved by the algorithm)."""
    out: dict[str, tuple[Callable[[], object], int]] = {}
    if device.type == "cuda":
        out["adamw_fused"] = (torch.optim.AdamW(param_set.params(), fused=True).step, 28)
    out["adamw_foreach"] = (torch.optim.AdamW(param_set.params(), foreach=True).step, 28)
    if device.type == "cuda":
        out["vradam_fused (class)"] = (VRAdam(param_set.params(), fused=True).step, 36)
    groups = param_set.groups()
    out["vradam_fused (functional)"] = (
        lambda: fused_triton.fused_step(groups, **OPTIONS, config=best), 36)
    if device.type == "cuda":
        graph_groups = param_set.groups()
        graph = capture_step(
            lambda: fused_triton.fused_step(graph_groups, **OPTIONS, config=best), device)
        out["vradam_fused (graph)"] = (graph.replay, 36)
    lagged_groups, previous = param_set.groups(), [torch.zeros((), device=device)]

    def lagged_step():
        (tel,) = fused_triton.fused_lagged_step(
            lagged_groups, **OPTIONS, previous_sq_norms=previous, config=best)
        previous[0] = tel.sq_norm

    out["vradam_lagged (functional)"] = (lagged_step, 28)
    out["vradam_foreach (class)"] = (VRAdam(param_set.params(), foreach=True).step, 36)
    out["vradam_naive_sync"] = (NaiveSyncVRAdam(param_set.params()).step, 36)
    return out


def format_table(timings: dict[str, float], nbytes: dict[str, int], numel: int,
                 copy_bytes_per_s: float) -> str:
    baseline_name = "adamw_fused" if "adamw_fused" in timings else "adamw_foreach"
    baseline, naive = timings[baseline_name], timings["vradam_naive_sync"]
    lines = [f"  {'step':<28}{'ms':>9}{'/ ' + baseline_name:>16}{'naive / this':>14}"
             f"{'GB/s':>9}{'% copy':>8}{'floor ms':>10}"]
    for name, seconds in timings.items():
        moved = nbytes[name] * numel
        lines.append(
            f"  {name:<28}{seconds * 1e3:>9.3f}{seconds / baseline:>16.3f}"
            f"{naive / seconds:>14.1f}{moved / seconds / 1e9:>9.0f}"
            f"{100 * moved / seconds / copy_bytes_per_s:>8.0f}"
            f"{moved / copy_bytes_per_s * 1e3:>10.3f}"
        )
    return "\n".join(lines)


def run(device: torch.device, scale: float, repeats: int) -> str:
    shapes = gpt2_small_shapes(scale)
    param_set = make_param_set(shapes, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"
    parts = [f"torch {torch.__version__}, {name}, GPT-2-small-shaped at scale {scale}: "
             f"{len(shapes)} tensors, {param_set.numel / 1e6:.2f} M float32 values"]
    parts += ["checks:"] + ["  " + line for line in check(param_set, device)]

    copy_nbytes = max(4 * param_set.numel, 1 << 20) if device.type == "cuda" else 1 << 16
    copy_bps = copy_bandwidth(device, copy_nbytes, repeats)
    parts.append(f"copy bandwidth ({copy_nbytes / 2**20:.1f} MiB buffer): "
                 f"{copy_bps / 1e9:.0f} GB/s")

    swept = sweep(param_set, device, max(1, repeats // 3) if device.type != "cuda" else 5)
    parts.append("launch shapes of the fused step (chunk, block, warps: ms):")
    parts += [f"  {c.chunk:>6} {c.block:>5} {c.num_warps:>2}: {s * 1e3:.3f}" for c, s in swept]
    best = swept[0][0]

    table = contenders(param_set, device, best)
    timings = interleaved_medians({k: step for k, (step, _) in table.items()}, device,
                                  per_batch=_per_batch(device), repeats=repeats, warmup=2)
    nbytes = {k: b for k, (_, b) in table.items()}
    parts.append(f"median step time over {repeats} batches of {_per_batch(device)} "
                 f"(functional and graph rows at chunk {best.chunk}, block {best.block}, "
                 f"warps {best.num_warps}):")
    parts.append(format_table(timings, nbytes, param_set.numel, copy_bps))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=None,
                        help="GPT-2 width multiplier (default 1.0 on CUDA: 124.4 M values; "
                             "0.01 on the interpreter)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed batches per contender (default 20 on CUDA, 1 interpreted)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runnable = torch.cuda.is_available() if device.type == "cuda" else fused_triton.is_interpreted()
    if not runnable:
        print("fused_step benchmark: needs a CUDA device (or TRITON_INTERPRET=1 for a CPU "
              "smoke run on tiny shapes); nothing timed. The CPU-side proof of the kernels "
              "is tests/vradam/test_fused_triton.py.")
        return
    if not fused_triton.is_available():
        print("fused_step benchmark: triton is not installed (pip install "
              "'eos-toolkit[fused]'); nothing timed.")
        return
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.01)
    repeats = args.repeats if args.repeats is not None else (20 if device.type == "cuda" else 1)
    if scale <= 0 or repeats < 1:
        raise ValueError(f"scale={scale}, repeats={repeats}; allowed: scale > 0, repeats >= 1")
    print(run(device, scale, repeats))


if __name__ == "__main__":
    main()
