"""Wall-clock timing for the benchmarks: the device synchronised, then the clock read.

A time starts and ends with the device's queued work done
(:func:`eos_toolkit.collectives.synchronize`: CUDA's queue drained, nothing
to wait for on the CPU), so it covers the device work launched inside it and
nothing launched before.  Each such wait is a deliberate sync, for timing only.

* :class:`Stopwatch`: the seconds of a ``with`` block; :meth:`Stopwatch.lap`
  reads the clock inside it without waiting (a split, such as an operator's
  set-up inside a whole solve).
* :func:`timed`: ``(fn(), seconds)``.
* :func:`interleaved_medians`: the median seconds per call of several jobs,
  timed in turn round after round, so a slow spell of a shared machine falls
  on all of them alike.

``barrier=True`` also waits for every rank of the default process group
(``torch.distributed.barrier``) at both ends: data-parallel ranks start and
stop the clock together.

Example::

    >>> import torch
    >>> cpu = torch.device("cpu")
    >>> value, seconds = timed(lambda: sum(range(10)), cpu)
    >>> value, seconds >= 0
    (45, True)
    >>> with Stopwatch(cpu) as watch:
    ...     split = watch.lap()
    >>> 0 <= split <= watch.seconds
    True
    >>> medians = interleaved_medians({"a": lambda: None, "b": lambda: None}, cpu, repeats=3)
    >>> sorted(medians), all(s >= 0 for s in medians.values())
    (['a', 'b'], True)
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from eos_toolkit.collectives import synchronize

T = TypeVar("T")


class Stopwatch:
    """Wall seconds of a ``with`` block (``seconds``, set on exit), the device synchronised at both ends."""

    def __init__(self, device: torch.device | str, *, barrier: bool = False):
        self.device, self.barrier = torch.device(device), barrier
        self.start: float | None = None
        self.seconds: float | None = None

    def _wait(self) -> None:
        synchronize(self.device)  # sync: timing only
        if self.barrier:
            torch.distributed.barrier()

    def __enter__(self) -> Stopwatch:
        self._wait()
        self.start = time.perf_counter()
        return self

    def lap(self) -> float:
        """Seconds since the block began, read without waiting for the device."""
        return time.perf_counter() - self.start

    def __exit__(self, *exc) -> bool:
        self._wait()
        self.seconds = time.perf_counter() - self.start
        return False


def timed(fn: Callable[[], T], device: torch.device | str, *, barrier: bool = False) -> tuple[T, float]:
    """``(fn(), wall seconds of the call)``, the device synchronised before and after."""
    with Stopwatch(device, barrier=barrier) as watch:
        result = fn()
    return result, watch.seconds


def interleaved_medians(jobs: Mapping[str, Callable[[], object]], device: torch.device | str, *, repeats: int,
                        warmup: int = 1, per_batch: int = 1, barrier: bool = False) -> dict[str, float]:
    """Median wall seconds per call of each job over ``repeats`` rounds, after ``warmup`` rounds left out.

    A round times every job once, in the mapping's order.  A job's sample is
    ``per_batch`` back-to-back calls between two synchronisations, divided
    by ``per_batch``: launch overhead then counts only where it exceeds the
    device's work.
    """
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in range(warmup + repeats):
        for name, job in jobs.items():
            with Stopwatch(device, barrier=barrier) as watch:
                for _ in range(per_batch):
                    job()
            if round_index >= warmup:
                samples[name].append(watch.seconds / per_batch)
    return {name: statistics.median(s) for name, s in samples.items()}
