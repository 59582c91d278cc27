"""Run-record metrics as TensorBoard scalars: live from a monitor, or exported from records.

Every metric goes under one prefix, ``eos/<metric>`` (``eos/sharpness``,
``eos/threshold``, ``eos/precond_sharpness``, ``eos/eta``, ...; the names are
:mod:`eos_toolkit.metrics`), at its step.  Needs the ``tensorboard`` package
(``pip install 'eos-toolkit[integrations]'``).

Example::

    >>> import tempfile
    >>> sink = TensorBoardSink(tempfile.mkdtemp())
    >>> sink([(0, "sharpness", 3.5), (0, "threshold", 40.0)])
    >>> sink.close()
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from eos_toolkit import record

PREFIX = "eos"


def _summary_writer(log_dir: str | os.PathLike):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"TensorBoard scalars need the tensorboard package ({err}); "
                          "pip install 'eos-toolkit[integrations]'") from None
    return SummaryWriter(log_dir=str(log_dir))


def tag(metric: str, prefix: str = PREFIX) -> str:
    """The scalar's tag in TensorBoard: ``eos/sharpness``."""
    return f"{prefix}/{metric}"


class TensorBoardSink:
    """A monitor sink (``EoSMonitor(..., sinks=[TensorBoardSink(log_dir)])``): each row one scalar.

    ``target``: a log directory, or a ``SummaryWriter`` already open (the
    sink then leaves closing it to its owner).
    """

    def __init__(self, target, prefix: str = PREFIX):
        self.owns = isinstance(target, (str, os.PathLike))
        self.writer = _summary_writer(target) if self.owns else target
        self.prefix = prefix

    def __call__(self, rows: Iterable[tuple[int, str, float]]) -> None:
        for step, metric, value in rows:
            self.writer.add_scalar(tag(metric, self.prefix), float(value), int(step))
        self.writer.flush()

    def close(self) -> None:
        if self.owns:
            self.writer.close()


def export_records(sources: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                   prefix: str = PREFIX) -> list[Path]:
    """Write every run record found under ``sources`` as TensorBoard event files in ``out_dir/<run>``.

    Returns the log directories written, one per record (damaged records are
    skipped, as :func:`eos_toolkit.record.find_runs` and the readers do).
    """
    out_dir = Path(out_dir)
    written = []
    for source in sources:
        for run_dir in record.find_runs(source):
            try:
                metrics = record.read_metrics(run_dir)
            except record.DamagedRecordError:
                continue
            log_dir = out_dir / run_dir.name
            sink = TensorBoardSink(log_dir, prefix)
            sink(metrics[["step", "metric", "value"]].itertuples(index=False, name=None))
            sink.close()
            written.append(log_dir)
    return written
