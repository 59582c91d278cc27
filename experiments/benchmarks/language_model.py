"""Benchmark the default language model: training throughput and the cost of its Hessian-vector products.

Builds the ``language-model`` task exactly as ``eos run language-model`` would
(its defaults, ``--data`` and any ``--set KEY=VALUE``), then prints, as
medians over interleaved repeats measured in one run:

* one AdamW training step (forward, backward, step) in tokens per second;
* the gradient of the loss on the tracking windows, and one Hessian-vector
  product per method on the same windows, as a ratio to that gradient.

    python -m experiments.benchmarks.language_model --data shakespeare --threads 2
"""

from __future__ import annotations

import argparse
import warnings

import torch

from eos_toolkit.batches import as_args
from eos_toolkit.hvp import hessian_operator
from eos_toolkit.settings import METHODS
from experiments.benchmarks.timing import interleaved_medians
from experiments.config import RunConfig
from experiments.optim import build_optimizer, parameter_groups
from experiments.resolve import resolve
from experiments.tasks import build_task
from experiments.tasks.base import size_weighted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="auto", help="corpus (as eos run --data)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any RunConfig key, JSON value (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import json

    overrides = {}
    for item in args.overrides:
        key, _, raw = item.partition("=")
        overrides[key] = json.loads(raw)
    cfg = resolve(RunConfig(task="language-model", dataset=args.data, data_dir=args.data_dir, device=args.device,
                    **overrides))
    device = torch.device(args.device)
    task = build_task(cfg, device, torch.float32)
    model = task.model
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"language model on {task.data_info['dataset']} ({task.data_info['level']} level, vocabulary "
          f"{task.vocab_size}): {n_params:,} parameters, context {cfg.context}, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads, {device}")

    def train_step(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        for inputs, targets, weight in task.train_chunks(step):
            (task.loss_fn(model(*as_args(inputs)), targets) * weight).backward()
        optimizer.step()

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        for x, y, w in size_weighted(task.track_batches):
            torch.autograd.grad(task.loss_fn(model(x), y) * w, params)

    ops = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the math-attention fallback is announced once per method
        for method in METHODS:
            ops[method] = hessian_operator(model, task.loss_fn, task.track_batches, method=method)
            ops[method].matvec(torch.randn(ops[method].dim, device=device))
    v = torch.randn(ops[METHODS[0]].dim, device=device)
    jobs = {"train step": lambda: train_step(0), "gradient": gradient,
            **{f"hvp {m}": (lambda m=m: ops[m].matvec(v)) for m in METHODS}}
    median = interleaved_medians(jobs, device, repeats=args.repeats, warmup=1)
    tokens = cfg.batch_size * cfg.context
    print(f"train step: {median['train step'] * 1e3:.1f} ms, {tokens / median['train step']:,.0f} tokens/s")
    print(f"gradient on {sum(len(y) for _, y in task.track_batches)} tracking windows: "
          f"{median['gradient'] * 1e3:.1f} ms")
    for m in METHODS:
        print(f"  hvp {m:22s} {median[f'hvp {m}'] * 1e3:8.1f} ms  {median[f'hvp {m}'] / median['gradient']:.2f}x gradient")


if __name__ == "__main__":
    main()
