"""Data-parallel cost: training-step and Hessian-vector-product time on 1 rank against N ranks.

Builds the real run (``experiments.train``'s trainer: the task, the DDP
wrapper, the tracker with its all-reduced operator) on each rank of a gloo
(CPU) or nccl (GPU) group started here, and times, interleaved and as
medians over repeats, one optimizer step and one Hessian-vector product of
the tracker. The default is the edge-of-stability MLP on 1,000 Fashion-MNIST
images (full batch, chunks of 1,000). Ratios are against the 1-rank time
measured in the same invocation. On a machine with fewer cores than
``threads x ranks`` the ranks compete for cores and nothing speeds up: the
figure then measures the overhead of the collectives, not the scaling.

    python -m experiments.benchmarks.distributed --ranks 1 2 --threads 1
    eos bench distributed --ranks 1 2 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from eos_toolkit.settings import METHODS
from experiments.benchmarks.timing import interleaved_medians
from experiments.config import RunConfig


def _rank_main(rank: int, world: int, cfg: RunConfig, threads: int, repeats: int, store: str, out: str) -> None:
    """One rank: build the run of ``cfg`` in a group of ``world``, time its step and its tracker's product
    (medians of ``repeats``, every rank starting and stopping each clock together); rank 0 writes them to ``out``."""
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # not one inherited from a launcher around this benchmark
    torch.set_num_threads(threads)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from experiments import distributed
        from experiments.resolve import resolve
        from experiments.train import build_trainer

        cfg = resolve(cfg)
        trainer = build_trainer(cfg, Path(out), distributed.setup(cfg.device))
        op = trainer.tracker.hessian
        v = torch.randn(op.dim, dtype=op.dtype, device=op.device, generator=torch.Generator(op.device).manual_seed(0))
        medians = interleaved_medians({"step": trainer.train_step, "hvp": lambda: op.matvec(v)}, op.device,
                                      repeats=repeats, warmup=1, barrier=True)
        if rank == 0:
            Path(out, f"world{world}.json").write_text(json.dumps({
                "step": medians["step"], "hvp": medians["hvp"],
                "params": op.dim, "examples_per_rank": sum(len(y) for _, y in op.batches)}))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--task", default="eos-fullbatch")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--hvp-method", default="forward_over_reverse", choices=METHODS,
                        help="the product rule timed (auto would time forward-over-reverse: nothing is chosen yet)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {max(args.ranks)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    print(f"{args.task} on {args.n_train} {args.dataset} examples, device {args.device}, {args.threads} thread(s) "
          f"per rank, torch {torch.__version__}, medians of {args.repeats}")
    cfg = RunConfig(task=args.task, dataset=args.dataset, n_train=args.n_train, chunk_size=args.chunk_size,
                    optimizer="gd", lr=0.01, steps=1000, device=args.device, data_dir=args.data_dir,
                    hvp_method=args.hvp_method)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            store = Path(tmp) / f"store{world}"
            torch.multiprocessing.spawn(_rank_main, args=(world, cfg, args.threads, args.repeats, str(store), tmp),
                                        nprocs=world, join=True)
            results[world] = json.loads((Path(tmp) / f"world{world}.json").read_text())
    base = results[args.ranks[0]]
    print(f"{'ranks':>5} {'examples/rank':>13} {'step ms':>9} {'x base':>7} {'HVP ms':>9} {'x base':>7}")
    for world, r in results.items():
        print(f"{world:>5} {r['examples_per_rank']:>13} {r['step'] * 1e3:>9.1f} {r['step'] / base['step']:>7.2f} "
              f"{r['hvp'] * 1e3:>9.1f} {r['hvp'] / base['hvp']:>7.2f}")


if __name__ == "__main__":
    main()
