"""Shared fixtures: the Agg backend, hand-made records, the synthetic run set."""

import matplotlib
import pytest

matplotlib.use("Agg")

from eos_toolkit.record import RunWriter  # noqa: E402
from tests.analysis.fixtures import write_fixture_runs  # noqa: E402


def make_run(root, name, config, rows, events=(("started", 0), ("finished", None)), density=()):
    """A run record from explicit (step, metric, value) rows; events as (name, step or None = last step)."""
    w = RunWriter.create(root / name, config=config, environment={"python": "3.11"})
    last = max((s for s, _, _ in rows), default=0)
    for event, step in events:
        if event in ("started", "resumed"):
            w.event(event, step=step or 0)
    w.log_metrics(rows)
    for step, xs, ds in density:
        w.log_density(step, xs, ds)
    for event, step in events:
        if event not in ("started", "resumed"):
            w.event(event, step=last if step is None else step)
    return root / name


@pytest.fixture(scope="session")
def synthetic_runs(tmp_path_factory):
    """The synthetic set of tests/analysis/fixtures.py (short runs), written once per session."""
    root = tmp_path_factory.mktemp("runs")
    write_fixture_runs(root, steps=200, seeds=2)
    return root


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
