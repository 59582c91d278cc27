"""The run record: one self-describing directory per training run.

A run record is what a training run leaves behind and the only thing the
analysis reads. It is plain files (JSON, JSON lines, CSV) so that pandas reads it
on a laptop without torch, and it is written so that a run killed at any moment
leaves a record that still loads.

Layout::

    <run_dir>/
      config.json        the resolved configuration (written once, atomically)
      environment.json   versions, device, git commit, data source and checksum
      events.jsonl       one JSON object per line, appended:
                         {"time": ISO-8601 UTC, "event": NAME, "step": int, ...}
      metrics.csv        the tidy metrics table, appended in blocks:
                         step,metric,value   (one row per step x metric)
      density.csv        optional: spectral density estimates, appended:
                         step,eigenvalue,density   (a curve per measured step)
      checkpoints/       written by the training loop (torch files), atomically
      .lock              held (flock) by the one process writing the record: see RunLock

Event names: ``started``, ``resumed``, ``checkpoint``, ``diverged``,
``finished``, ``failed``, ``warning`` (a measurement the run could not make,
with a ``message``; the run goes on). The run's status is derived from the events (see
:func:`run_status`): the last terminal event (``finished``, ``diverged``,
``failed``) if there is one after the last ``started``/``resumed``, otherwise
``incomplete`` (still running, or killed).

Metric names: :mod:`eos_toolkit.metrics`, the vocabulary writers and readers
share (tasks may add more).

Thresholds. Every threshold value is one formula of
``eos_toolkit/thresholds.py``, chosen by the optimizer's adapter
(``eos_toolkit/adapters.py``): 2/lr for gradient descent, 2(1+beta)/lr for
torch's heavy ball (2(1+beta)/((1-d) lr) with dampening d) and for RMSprop's
momentum, 2(1+beta)/((1+2 beta) lr) for Nesterov, 2(1+beta1)/((1-beta1) lr)
(38/lr at beta1 = 0.9) for the Adam family, whose preconditioner P carries
bias corrections (and RAdam's rectification). Which step: a measurement at
step t (parameters after t updates, before step t is taken) is compared with
the rates of step t - 1, the step that produced those parameters and left P
in the optimizer state (``lr`` and ``eta`` as recorded at step t - 1). At
t = 0 the threshold uses the scheduled rate of step 0; the preconditioned
metrics and ``precond_threshold_eta`` start at the first tracking step after
a step has been taken. Weight decay is left out of the thresholds: decoupled
decay (AdamW, VRAdam) shrinks the parameters by ``1 - eta wd`` per step, and
coupled L2 (SGD, Adam, RMSprop, RAdam with ``weight_decay``) adds ``wd I`` to
the objective's Hessian while ``sharpness`` is the loss's; both are small
next to the curvature at the edge for the usual ``wd``.

This module imports only the standard library (and pandas inside
:func:`read_metrics`), so the analysis can use it without torch.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> w = RunWriter.create(d, config={"task": "demo", "lr": 0.1})
    >>> w.event("started", step=0)
    >>> w.log_metrics([(0, "train_loss", 1.5), (0, "sharpness", 3.0)])
    >>> w.event("finished", step=0)
    >>> r = read_run(d)
    >>> r.status, len(r.metrics)
    ('finished', 2)
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
DENSITY_FILE = "density.csv"
METRICS_HEADER = "step,metric,value\n"
DENSITY_HEADER = "step,eigenvalue,density\n"

TERMINAL_EVENTS = ("finished", "diverged", "failed")
START_EVENTS = ("started", "resumed")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds precision)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half.

    The bytes go to a temporary file in the same directory, are flushed to
    disk, and the temporary file is renamed over ``path`` (``os.replace`` is
    atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes_atomic(path, text.encode())


def _json_default(obj: Any) -> Any:
    # Paths, tuples of numbers and numpy / torch scalars appear in configs.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store a {type(obj).__name__} in a run record: {obj!r}")


def _format_value(value: float) -> str:
    # repr round-trips a float exactly; nan/inf are written so pandas reads them back.
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


LOCK_FILE = ".lock"


class RunLockedError(FileExistsError):
    """Another process is writing this run record; the message names its pid and host."""


class RunLock:
    """The one-writer lock of a run record: ``flock`` on ``<run_dir>/.lock``, held until :meth:`release`.

    The kernel releases it when the holder dies (kill -9 included), so a
    crashed run never leaves a stale lock; the file keeps the last holder's
    pid, host and start time for the error message. A second writer gets
    :class:`RunLockedError` at once (no waiting). On systems without
    ``fcntl`` the lock is not enforced.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX: no enforcement
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(self._fd)
            self._fd = None
            raise RunLockedError(f"{self.run_dir} is being written by {holder}; wait for it to finish or stop it "
                                 "(one writer per record)") from None
        import socket

        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}".encode(), 0)

    def release(self) -> None:
        """Give the record up (also done by the kernel when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunWriter:
    """Appends to a run record. Thin: every write is a small, durable file operation.

    ``create`` starts a new record (the directory must not hold one already);
    ``open`` reopens an existing record to resume it. Both take the record's
    :class:`RunLock` (or one the caller already holds); :meth:`close` gives it up.
    """

    def __init__(self, run_dir: str | os.PathLike, lock: RunLock | None = None):
        self.run_dir = Path(run_dir)
        self.lock = lock

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def create(cls, run_dir: str | os.PathLike, config: dict, environment: dict | None = None,
               lock: RunLock | None = None) -> "RunWriter":
        run_dir = Path(run_dir)
        lock = lock or RunLock(run_dir)
        if (run_dir / CONFIG_FILE).exists():
            lock.release()
            raise FileExistsError(f"{run_dir} already holds a run record; choose a new directory or resume it")
        write_json_atomic(run_dir / CONFIG_FILE, config)
        write_json_atomic(run_dir / ENVIRONMENT_FILE, environment or {})
        write_bytes_atomic(run_dir / METRICS_FILE, METRICS_HEADER.encode())
        return cls(run_dir, lock)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, lock: RunLock | None = None) -> "RunWriter":
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{run_dir} holds no run record (no {CONFIG_FILE})")
        return cls(run_dir, lock or RunLock(run_dir))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def update_environment(self, **entries: Any) -> None:
        """Merge ``entries`` into environment.json (atomically)."""
        env = _read_json(self.run_dir / ENVIRONMENT_FILE, default={})
        env.update(entries)
        write_json_atomic(self.run_dir / ENVIRONMENT_FILE, env)

    def event(self, name: str, step: int, **details: Any) -> None:
        """Append one event line, flushed to disk before returning."""
        line = json.dumps({"time": utc_now(), "event": name, "step": int(step), **details}, default=_json_default)
        self._append(EVENTS_FILE, line + "\n")

    def log_metrics(self, rows: Iterable[tuple[int, str, float]]) -> None:
        """Append ``(step, metric, value)`` rows to metrics.csv in one durable write."""
        text = "".join(f"{int(s)},{m},{_format_value(v)}\n" for s, m, v in rows)
        if text:
            self._append(METRICS_FILE, text)

    def log_density(self, step: int, eigenvalues: Iterable[float], density: Iterable[float]) -> None:
        """Append one spectral-density curve (density evaluated at ``eigenvalues``) for ``step``."""
        path = self.run_dir / DENSITY_FILE
        if not path.exists():
            write_bytes_atomic(path, DENSITY_HEADER.encode())
        text = "".join(f"{int(step)},{_format_value(x)},{_format_value(d)}\n" for x, d in zip(eigenvalues, density))
        self._append(DENSITY_FILE, text)

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metric rows with step > ``step`` (used on resume from a checkpoint at ``step``).

        Rows written after the checkpoint will be computed again by the resumed
        run; keeping them would duplicate them.
        """
        for name in (METRICS_FILE, DENSITY_FILE):
            lines = _complete_lines(self.run_dir / name)
            if not lines:
                continue
            kept = [lines[0]] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
            write_bytes_atomic(self.run_dir / name, "".join(line + "\n" for line in kept).encode())

    def drop_metrics(self, dropped: Callable[[str], bool]) -> int:
        """Remove the metric rows whose name ``dropped(name)`` is true (one atomic rewrite); returns how many.

        For measurements made again over a finished run (``eos flow --replace``).
        """
        lines = _complete_lines(self.run_dir / METRICS_FILE)
        if not lines:
            return 0
        kept = [lines[0]] + [line for line in lines[1:] if not dropped(line.split(",", 2)[1])]
        write_bytes_atomic(self.run_dir / METRICS_FILE, "".join(line + "\n" for line in kept).encode())
        return len(lines) - len(kept)

    def _append(self, name: str, text: str) -> None:
        path = self.run_dir / name
        # A kill during a previous append may have left a partial last line;
        # cut it off first, so that it can never be read back as a (wrong) row.
        _drop_partial_last_line(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _drop_partial_last_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate ``path`` just after its last newline (a no-op when it ends with one)."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            i = block.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


def _complete_lines(path: Path) -> list[str]:
    """Lines of a text file, without a trailing partial line left by a kill."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [line for line in text.split("\n") if line]


class DamagedRecordError(ValueError):
    """A run record's file cannot be read; the message names the file and, for tables, the line."""


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise DamagedRecordError(f"{path} is not valid JSON ({where})") from None


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """The run's events in order; a partial last line (a kill mid-write) is ignored."""
    events = []
    for line in _complete_lines(Path(run_dir) / EVENTS_FILE):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line broken by a kill before a later append started a fresh one
    return events


def run_status(events: list[dict]) -> str:
    """``finished`` / ``diverged`` / ``failed`` / ``incomplete`` / ``empty``, derived from events.

    The last terminal event after the last (re)start decides; a run that was
    (re)started and has no terminal event since is ``incomplete``.
    """
    status = "empty"
    for e in events:
        if e.get("event") in START_EVENTS:
            status = "incomplete"
        elif e.get("event") in TERMINAL_EVENTS:
            status = e["event"]
    return status


def _read_table(path: Path, columns: dict[str, str], key: list[str]):
    import pandas as pd

    lines = _complete_lines(path)
    if len(lines) <= 1:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    names = list(columns)
    if lines[0].split(",") != names:
        raise DamagedRecordError(f"{path} line 1: header {lines[0]!r}, expected {','.join(names)!r}")
    for number, line in enumerate(lines[1:], start=2):  # name the first line that is not a row
        fields = line.split(",")
        try:
            if len(fields) != len(names):
                raise ValueError
            for field, kind in zip(fields, columns.values()):
                if kind == "int64":
                    int(field)
                elif kind == "float64":
                    float(field)
        except ValueError:
            raise DamagedRecordError(f"{path} line {number}: {line[:80]!r} is not a {','.join(names)} row") from None
    df = pd.read_csv(io.StringIO("\n".join(lines) + "\n"), dtype=columns)
    return df.drop_duplicates(key, keep="last").reset_index(drop=True)


def read_metrics(run_dir: str | os.PathLike):
    """The tidy metrics table as a pandas DataFrame with columns step, metric, value.

    Rows are de-duplicated on (step, metric), keeping the last one written.
    """
    columns = {"step": "int64", "metric": "object", "value": "float64"}
    return _read_table(Path(run_dir) / METRICS_FILE, columns, ["step", "metric"])


def read_density(run_dir: str | os.PathLike):
    """Spectral-density curves as a DataFrame (step, eigenvalue, density); empty when none."""
    columns = {"step": "int64", "eigenvalue": "float64", "density": "float64"}
    return _read_table(Path(run_dir) / DENSITY_FILE, columns, ["step", "eigenvalue"])


@dataclass
class RunRecord:
    """Everything a run record holds, read back (no torch needed)."""

    run_dir: Path
    config: dict
    environment: dict
    events: list[dict]
    metrics: Any  # pandas.DataFrame: step, metric, value
    density: Any  # pandas.DataFrame: step, eigenvalue, density (may be empty)
    status: str = field(default="empty")

    @property
    def run_id(self) -> str:
        return self.run_dir.name


def read_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read a run record; a half-written or diverged run reads fine and says so in ``status``."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a run record: it has no {CONFIG_FILE}")
    events = read_events(run_dir)
    return RunRecord(
        run_dir=run_dir,
        config=_read_json(run_dir / CONFIG_FILE, default={}),
        environment=_read_json(run_dir / ENVIRONMENT_FILE, default={}),
        events=events,
        metrics=read_metrics(run_dir),
        density=read_density(run_dir),
        status=run_status(events),
    )


def is_run_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a run record."""
    return (Path(path) / CONFIG_FILE).is_file()


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``root``, sorted by path."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG_FILE) if is_run_dir(p.parent))
