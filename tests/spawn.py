"""Run a function on N CPU ranks joined by a gloo process group, from inside a test.

``spawn_ranks(fn, tmp_path, *args, world_size=2)`` starts ``world_size``
processes (the "spawn" start method: each imports torch afresh, a second or
two on a busy machine), joins them through a file store in ``tmp_path`` (no
network port), calls ``fn(rank, world_size, *args)`` in each with one torch
thread, and re-raises, in the test, the first failure of any rank. ``fn``
must be a module-level function (the ranks import it by name) and reports
back by writing files (e.g. ``torch.save`` into ``tmp_path``).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def _entry(rank: int, fn, world_size: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)
    # A deadlock fails the test in a minute instead of gloo's default half hour.
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def spawn_ranks(fn, tmp_path: Path, *args, world_size: int = 2) -> None:
    store = Path(tmp_path) / "rendezvous"
    torch.multiprocessing.spawn(_entry, args=(fn, world_size, str(store), args), nprocs=world_size, join=True)
