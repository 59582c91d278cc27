"""Time one optimizer step: VRAdam's paths against torch's AdamW.

For a GPT-2-small-shaped parameter list (148 tensors; widths scaled by
``--scale``, so the parameter count scales as its square: 1.0 is 124 M, 0.3 is
about 11 M) and for a small MLP (784-200-200-10), it prints the median wall time
of one ``step()`` for:

* torch AdamW: for-loop, foreach, and fused where torch offers it,
* VRAdam: single-tensor, foreach (and fused when ``vradam.fused_triton`` loads
  on CUDA),
* a deliberately naive VRAdam that reads the squared norm back to the host once
  per tensor and allocates full-size temporaries, as the public code does,

each as a ratio to AdamW foreach measured in the same run. Steps of the
contenders are interleaved so that clock drift hits all of them alike; gradients
are fixed random tensors, so only the optimizer is timed.

    python -m experiments.benchmarks.optimizer_step --device cpu --scale 0.3 --repeats 30 --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from experiments.benchmarks.timing import interleaved_medians
from vradam import VRAdam, fused_triton


def gpt2_small_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (tied head): 148 tensors, widths times ``scale``."""
    d = max(8, round(768 * scale))
    vocab, context = max(8, round(50257 * scale)), max(8, round(1024 * scale))
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (context, d)] + block * 12 + [(d,), (d,)]


def mlp_shapes() -> list[tuple[int, ...]]:
    """The laptop edge-of-stability MLP, 784-200-200-10."""
    return [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


class NaiveSyncVRAdam(torch.optim.Optimizer):
    """VRAdam in the public code's style: one host read per tensor, fresh temporaries.

    Kept only as a point of comparison; the update is the same math as VRAdam's
    (global velocity gate), written the slow way.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), beta3=1.0, alpha1=10.0,
                 eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, beta3=beta3, alpha1=alpha1,
                                      eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        sq_norm = 0.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["v"] = torch.zeros_like(p)
                    state["m"] = torch.zeros_like(p)
                state["step"] += 1
                state["v"] = beta1 * state["v"] + (1 - beta1) * p.grad
                state["m"] = beta2 * state["m"] + (1 - beta2) * p.grad * p.grad
                sq_norm += float(state["v"].pow(2).sum())  # the per-tensor sync
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eta = group["lr"] / (1 + min(group["beta3"] * sq_norm, group["alpha1"]))
            for p in group["params"]:
                state = self.state[p]
                v_hat = state["v"] / (1 - beta1 ** state["step"])
                m_hat = state["m"] / (1 - beta2 ** state["step"])
                p.copy_(p * (1 - eta * group["weight_decay"]) - eta * v_hat / (m_hat.sqrt() + group["eps"]))


@dataclass
class Timing:
    name: str
    median_s: float
    ratio: float  # median / median of AdamW foreach


def _contenders(device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    contenders: dict[str, Callable] = {
        "adamw_forloop": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    }
    if device.type == "cuda":
        contenders["adamw_fused"] = lambda ps: torch.optim.AdamW(ps, fused=True)
    contenders["vradam_single_tensor"] = lambda ps: VRAdam(ps, foreach=False)
    contenders["vradam_foreach"] = lambda ps: VRAdam(ps, foreach=True)
    if device.type == "cuda" and fused_triton.is_available():
        contenders["vradam_fused"] = lambda ps: VRAdam(ps, fused=True)
    contenders["vradam_naive_sync"] = lambda ps: NaiveSyncVRAdam(ps)
    return contenders


def time_steps(shapes: list[tuple[int, ...]], device: torch.device, repeats: int,
               warmup: int, seed: int = 0) -> list[Timing]:
    """Median step time per contender on one parameter set, interleaved round robin."""
    gen = torch.Generator().manual_seed(seed)
    initial = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
    optimizers = {}
    for name, make in _contenders(device).items():
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in initial]  # each its own memory
        for p, g in zip(params, grads):
            p.grad = g  # shared and read-only: every optimizer sees the same gradient
        optimizers[name] = make(params)

    medians = interleaved_medians({name: opt.step for name, opt in optimizers.items()}, device,
                                  repeats=repeats, warmup=warmup)
    baseline = medians["adamw_foreach"]
    return [Timing(name, m, m / baseline) for name, m in medians.items()]


def format_table(title: str, timings: list[Timing]) -> str:
    lines = [title, f"  {'optimizer':<22}{'median ms':>12}{'/ adamw_foreach':>18}"]
    for t in timings:
        lines.append(f"  {t.name:<22}{t.median_s * 1e3:>12.3f}{t.ratio:>18.3f}")
    return "\n".join(lines)


def _count(shapes: list[tuple[int, ...]]) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def run(device: str = "cpu", scale: float = 0.3, repeats: int = 30, warmup: int = 3) -> str:
    """Run both parameter sets and return the printed report."""
    dev = torch.device(device)
    parts = [f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
             f"repeats {repeats} (median), warmup {warmup}"]
    for title, shapes in (
        (f"GPT-2-small-shaped, scale {scale}", gpt2_small_shapes(scale)),
        ("MLP 784-200-200-10", mlp_shapes()),
    ):
        header = f"{title}: {len(shapes)} tensors, {_count(shapes) / 1e6:.2f} M parameters"
        parts.append(format_table(header, time_steps(shapes, dev, repeats, warmup)))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=None,
                        help="GPT-2 width multiplier; parameters scale as its square "
                             "(default: 1.0 on CUDA, 0.3 = about 11 M on CPU)")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives steadier "
                             "numbers on a shared machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads={args.threads}; allowed: threads >= 1")
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"repeats={args.repeats}, warmup={args.warmup}; allowed: repeats >= 1, warmup >= 0")
    scale = args.scale if args.scale is not None else (1.0 if args.device.startswith("cuda") else 0.3)
    if scale <= 0:
        raise ValueError(f"scale={scale}; allowed: scale > 0")
    print(run(args.device, scale, args.repeats, args.warmup))


if __name__ == "__main__":
    main()
