"""Figure files and the markdown report are written, non-empty, and say what they skipped."""

import logging
import re
import struct

import pytest

import analysis
from tests.analysis.conftest import make_run
from tests.analysis.test_summary import gd_rows


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_save_figures_writes_png_and_pdf_and_skips_what_is_missing(tmp_path, caplog):
    make_run(tmp_path / "runs", "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0}, gd_rows())
    with caplog.at_level(logging.WARNING, logger="analysis"):
        paths = analysis.save_figures(tmp_path / "runs", tmp_path / "out")
    assert sorted(p.name for p in paths) == ["loss.pdf", "loss.png", "sharpness.pdf", "sharpness.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert open(tmp_path / "out" / "sharpness.pdf", "rb").read(5) == b"%PDF-"
    width, height = png_size(tmp_path / "out" / "sharpness.png")
    assert width >= 6.4 * 150 and height >= 4.0 * 150  # at least 150 dpi at the paper size
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "damping" in skipped and "spectrum" in skipped
    with pytest.raises(ValueError, match="unknown figure kinds"):
        analysis.save_figures(tmp_path / "runs", tmp_path / "out", kinds=("sharpnes",))


def test_save_figures_all_kinds_on_the_synthetic_set(synthetic_runs, tmp_path):
    runs = analysis.load_runs(synthetic_runs)
    paths = analysis.save_figures(runs, tmp_path, kinds=analysis.FIGURE_KINDS, formats=("png",), dpi=100)
    names = {p.name for p in paths}
    assert {"sharpness.png", "loss.png", "damping.png", "comparison.png", "spectrum_gd_lr0.05_s0.png",
            "density_gd_lr0.05_s0.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)


def test_write_report_one_run(tmp_path):
    make_run(tmp_path / "runs", "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0, "model": {"width": 200}},
             gd_rows())
    report = analysis.write_report(tmp_path / "runs" / "gd", tmp_path / "report")
    text = report.read_text()
    assert report.name == "report.md"
    for section in ("## Runs", "## Stability", "## Figures", "## Outcomes per run", "## Runs in detail"):
        assert section in text
    assert "## Comparison" not in text
    assert "**finished**" in text and "| model.width | 200 |" in text and '"python": "3.11"' in text
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "report" / link).stat().st_size > 1000
    assert "figures/sharpness.png" in text


def test_write_report_several_runs_has_the_comparison(synthetic_runs, tmp_path):
    report = analysis.write_report(synthetic_runs, tmp_path / "report", target_loss=0.2)
    text = report.read_text()
    assert "## Comparison" in text and "figures/comparison.png" in text and "figures/damping.png" in text
    assert "**diverged**" in text and "**incomplete**" in text
    assert "VRAdam lr=0.002" in text and "±" in text


def test_a_run_without_metrics_yet_gives_no_figures_and_a_report_that_says_so(tmp_path, caplog):
    make_run(tmp_path / "runs", "new", {"optimizer": "gd", "lr": 0.1, "seed": 0}, [], events=(("started", 0),))
    with caplog.at_level(logging.WARNING, logger="analysis"):
        assert analysis.save_figures(tmp_path / "runs", tmp_path / "figs", kinds=("all",)) == []
    assert len(caplog.records) == len(analysis.FIGURE_KINDS)
    text = analysis.write_report(tmp_path / "runs", tmp_path / "report").read_text()
    assert "**incomplete**" in text and "_No metrics logged yet._" in text and "_No figures" in text
