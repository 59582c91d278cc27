"""The tracking-step cost benchmark runs on tiny sizes and prints one row per way of running the monitor."""

import pytest

from experiments.benchmarks.monitor_cost import main


@pytest.mark.slow  # the frameworks' start-up: about 8 s
def test_the_monitor_cost_benchmark_prints_every_row(capsys):
    main(["--examples", "32", "--width", "8", "--products", "3", "--steps", "2", "--threads", "1"])
    out = capsys.readouterr().out
    for row in ("tracker.measure", "plain loop", "lightning", "hugging face"):
        assert f"  {row}" in out
    assert "tracker.measure                      " in out and "1.00" in out
