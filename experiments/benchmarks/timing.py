"""Wall-clock timing for the benchmarks: the device synchronised, then the clock read.

A time starts and ends with the device's queued work done
(:func:`eos_toolkit.collectives.synchronize`: CUDA's queue drained, nothing
to wait for on the CPU), so it covers the device work launched inside it and
nothing launched before.  Each such wait is a deliberate sync, for timing only.

* :class:`Stopwatch`: the seconds of a ``with`` block; :meth:`Stopwatch.lap`
  reads the clock inside it without waiting (a split, such as an operator's
  set-up inside a whole solve).
* :class:`EventStopwatch`: the same block on the device's own clock (CUDA
  events around it), which leaves the host's timer and the final wait out;
  off CUDA it is the wall clock.
* :func:`timed`: ``(fn(), seconds)``.
* :func:`interleaved_medians`: the median seconds per call of several jobs,
  timed in turn round after round, so a slow spell of a shared machine falls
  on all of them alike; ``clock="events"`` times each sample with
  :class:`EventStopwatch`.

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
    >>> interleaved_medians({"a": lambda: None}, cpu, repeats=1, clock="events")["a"] >= 0  # wall clock off CUDA
    True
"""
from __future__ import annotations

import functools
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


class EventStopwatch(Stopwatch):
    """Seconds of a ``with`` block as the device measured them: an event recorded before and after it.

    The device is synchronised before the block, as for :class:`Stopwatch`
    (nothing queued earlier is counted); then ``event_factory()`` makes two
    events (default on CUDA: ``torch.cuda.Event(enable_timing=True)``), the
    first recorded on the current stream at the start and the second at the
    end, and ``seconds`` is ``start.elapsed_time(end) / 1000`` once the end
    event has completed (a wait, for timing only).  The host's own timer
    and the wait are left out.  On a device without events (the CPU) and
    without a factory it is the wall clock of :class:`Stopwatch`.
    """

    def __init__(self, device: torch.device | str, *, barrier: bool = False,
                 event_factory: Callable[[], object] | None = None):
        super().__init__(device, barrier=barrier)
        if event_factory is None and self.device.type == "cuda":
            event_factory = functools.partial(torch.cuda.Event, enable_timing=True)
        self.event_factory = event_factory
        self._events: tuple | None = None

    def __enter__(self) -> EventStopwatch:
        super().__enter__()
        if self.event_factory is not None:
            self._events = (self.event_factory(), self.event_factory())
            self._events[0].record()
        return self

    def __exit__(self, *exc) -> bool:
        if self._events is None:
            return super().__exit__(*exc)
        start, end = self._events
        end.record()
        end.synchronize()  # sync: timing only
        if self.barrier:
            torch.distributed.barrier()
        self.seconds = start.elapsed_time(end) / 1e3
        return False


CLOCKS = {"wall": Stopwatch, "events": EventStopwatch}


def timed(fn: Callable[[], T], device: torch.device | str, *, barrier: bool = False) -> tuple[T, float]:
    """``(fn(), wall seconds of the call)``, the device synchronised before and after."""
    with Stopwatch(device, barrier=barrier) as watch:
        result = fn()
    return result, watch.seconds


def interleaved_medians(jobs: Mapping[str, Callable[[], object]], device: torch.device | str, *, repeats: int,
                        warmup: int = 1, per_batch: int = 1, barrier: bool = False,
                        clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each job over ``repeats`` rounds, after ``warmup`` rounds left out.

    A round times every job once, in the mapping's order.  A job's sample is
    ``per_batch`` back-to-back calls between two synchronisations, divided
    by ``per_batch``: launch overhead then counts only where it exceeds the
    device's work.  ``clock``: ``"wall"`` (:class:`Stopwatch`) or
    ``"events"`` (:class:`EventStopwatch`: CUDA events on CUDA, the wall
    clock elsewhere).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}; allowed: {', '.join(CLOCKS)}")
    stopwatch = CLOCKS[clock]
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in range(warmup + repeats):
        for name, job in jobs.items():
            with stopwatch(device, barrier=barrier) as watch:
                for _ in range(per_batch):
                    job()
            if round_index >= warmup:
                samples[name].append(watch.seconds / per_batch)
    return {name: statistics.median(s) for name, s in samples.items()}
