"""The README's code in "In your own training code" runs as written and prints what it says."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## In your own training code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_the_three_ways():
    found = snippets()
    assert len(found) == 3
    assert "EoSMonitor" in found[0] and "EoSCallback" in found[1] and "EoSTrainerCallback" in found[2]


@pytest.mark.parametrize("index, needs", [(0, None), (1, "lightning"), (2, "transformers")])
def test_a_snippet_runs_and_writes_a_record(index, needs, tmp_path, monkeypatch, capsys):
    if needs:
        pytest.importorskip(needs)
    if index == 2:
        pytest.importorskip("accelerate")
    from eos_toolkit.record import find_runs, read_run

    monkeypatch.chdir(tmp_path)
    exec(compile(snippets()[index], f"README snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "sharpness" in printed and "nan" not in printed.lower()
    (record,) = find_runs(tmp_path / "runs")
    run = read_run(record)
    assert run.status == "finished" and "precond_sharpness" in set(run.metrics.metric)
