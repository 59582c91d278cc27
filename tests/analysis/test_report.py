"""Figure files and the markdown report: decoded PNGs show the data, tables hold the recorded numbers."""

import logging
import re

import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import analysis
from tests.analysis.conftest import make_run
from tests.analysis.test_summary import gd_rows

OKABE_ITO_BLUE = "#0072B2"  # the first colour of Okabe & Ito's palette: the first run label's lines


def pixels(path):
    """A PNG decoded with matplotlib: (height, width, 3) RGB as integers 0..255."""
    return np.round(matplotlib.image.imread(path)[..., :3] * 255).astype(int)


def coloured(img):
    """Pixels of a clear colour (not white, grey or black): data, not frame, ticks or text."""
    return (img.max(axis=-1) - img.min(axis=-1)) > 60


def near(img, colour, tol=8):
    rgb = np.array(matplotlib.colors.to_rgb(colour)) * 255
    return np.abs(img - rgb).max(axis=-1) <= tol


def markdown_rows(text, section):
    """The first markdown table under ``## section`` as a list of {column: cell} dicts."""
    body = text.split(f"## {section}\n", 1)[1]
    lines = [line for line in body.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows]


def test_save_figures_writes_png_and_pdf_and_skips_what_is_missing(tmp_path, caplog):
    """The PNGs decode to 6.4 x 4.0 in at the documented 200 dpi with the run's line in its palette colour
    across the axes; the PDFs are PDFs; the kinds without data are named in the log."""
    make_run(tmp_path / "runs", "gd", {"optimizer": "gd", "lr": 0.05, "seed": 0}, gd_rows())
    with caplog.at_level(logging.WARNING, logger="analysis"):
        paths = analysis.save_figures(tmp_path / "runs", tmp_path / "out")
    assert sorted(p.name for p in paths) == ["loss.pdf", "loss.png", "sharpness.pdf", "sharpness.png"]
    for kind in ("sharpness", "loss"):
        assert open(tmp_path / "out" / f"{kind}.pdf", "rb").read(5) == b"%PDF-"
        img = pixels(tmp_path / "out" / f"{kind}.png")
        assert img.shape == (4.0 * 200, 6.4 * 200, 3)
        blue = near(img, OKABE_ITO_BLUE)
        assert blue.sum() > 500, kind  # the run's line (and the dashed threshold) were drawn
        columns = np.flatnonzero(blue.any(axis=0))
        assert columns.max() - columns.min() > 0.6 * img.shape[1], kind  # from the first step to the last
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
    for path in paths:  # each decodes to 6.4 x 4.0 in at 100 dpi with data drawn in colour
        img = pixels(path)
        assert img.shape == (400, 640, 3), path.name
        assert coloured(img).sum() > 300, path.name


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
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert links == ["figures/sharpness.png", "figures/loss.png"]
    for link in links:
        assert near(pixels(tmp_path / "report" / link), OKABE_ITO_BLUE).sum() > 500, link
    # The stability row against the rows themselves: first step with sharpness >= threshold, and the steps
    # from each measurement at or above it to the next measurement.
    rows = pd.DataFrame(gd_rows(), columns=["step", "metric", "value"]).pivot(index="step", columns="metric",
                                                                             values="value")
    above = rows["sharpness"] >= rows["threshold"]
    gaps = pd.Series(rows.index, index=rows.index).diff().shift(-1)
    (stability,) = markdown_rows(text, "Stability")
    assert float(stability["first_crossing_step"]) == above.idxmax()
    assert float(stability["steps_above_threshold"]) == gaps[above].sum()


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
