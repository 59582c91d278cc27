"""Derived quantities on hand-made series with answers worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import derived as d


def series(values, steps=None):
    return pd.Series([float(v) for v in values], index=steps if steps is not None else range(len(values)))


def test_threshold_crossing_and_time_above():
    steps = [0, 10, 20, 30, 40, 50]
    sharp = series([10, 30, 39, 41, 42, 39.5], steps)
    assert d.sharpness_ratio(sharp, 40.0).tolist() == [0.25, 0.75, 0.975, 1.025, 1.05, 0.9875]
    assert d.first_crossing_step(sharp, 40.0) == 30
    assert d.first_crossing_step(sharp, 40.0, level=0.95) == 20
    assert d.first_crossing_step(sharp, 50.0) is None
    # above at 30 and 40 (each holds for 10 steps); the last measurement counts none
    assert d.steps_above_threshold(sharp, 40.0) == 20
    assert d.steps_above_threshold(sharp, 40.0, level=0.95) == 30
    assert d.steps_above_threshold(sharp.iloc[:1], 1.0) == 0
    with pytest.raises(ValueError, match="level"):
        d.first_crossing_step(sharp, 40.0, level=0)


def test_threshold_series_aligns_on_common_steps():
    sharp = series([1.0, 4.0, 9.0], [0, 5, 10])
    thr = series([2.0, 2.0, 8.0], [0, 10, 20])  # step 5 has no threshold, step 20 no sharpness
    assert d.sharpness_ratio(sharp, thr).to_dict() == {0: 0.5, 10: 4.5}
    assert d.first_crossing_step(sharp, thr) == 10


def test_loss_rise_fraction():
    assert d.loss_rise_fraction(series([5, 4, 3, 2])) == 0.0
    assert d.loss_rise_fraction(series([1, 2, 1, 2, 1])) == 0.5
    # pairs touching the nan are skipped: (3 -> 4) rises, (4 -> 1) falls
    assert d.loss_rise_fraction(series([np.nan, 3, 4, 1])) == 0.5
    assert math.isnan(d.loss_rise_fraction(series([1.0])))


def test_sign_flip_rate():
    assert d.sign_flip_rate(series([1, -1, 1, -1, 1])) == 1.0
    assert d.sign_flip_rate(series([1, 2, 3])) == 0.0
    # zeros and nans dropped: 1, -1, -2, 3 -> flips at 2 of 3 pairs
    assert d.sign_flip_rate(series([1, 0, -1, np.nan, -2, 3])) == pytest.approx(2 / 3)
    assert math.isnan(d.sign_flip_rate(series([0, 0, 1])))


def test_update_cos_damping_and_clamp():
    assert d.mean_update_cos(series([0.5, -0.5, 1.0, np.nan])) == pytest.approx(1 / 3)
    ratio = d.damping_ratio(series([0.002, 0.001, 0.0004]), series([0.002, 0.002, 0.002]))
    assert ratio.tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert d.clamp_fraction(series([1, 0, 0, 1, 1, 0, 0, 0])) == 3 / 8
    assert math.isnan(d.clamp_fraction(series([])))


def test_smooth_ema_and_rolling():
    x = series([0.0, 4.0, np.inf, 2.0])
    # s = 0, 0.5*4 = 2, (inf skipped) 2, 0.5*2 + 0.5*2 = 2
    assert d.smooth(x, "ema", alpha=0.5).tolist() == [0.0, 2.0, 2.0, 2.0]
    assert d.smooth(series([1, 2, 3, 4]), "rolling", window=2).tolist() == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(ValueError, match="alpha"):
        d.smooth(x, alpha=0.0)
    with pytest.raises(ValueError, match="method"):
        d.smooth(x, method="median")


def test_steps_to_target():
    loss = series([1.0, 0.6, 0.45, 0.5, 0.3], [0, 10, 20, 30, 40])
    assert d.steps_to_target(loss, 0.5) == 20
    assert d.steps_to_target(loss, 0.1) is None
    assert d.steps_to_target(series([np.inf, 0.1]), 0.5) == 1


def test_mean_ci_against_a_hand_computation():
    # values 0.1, 0.2, 0.3: mean 0.2, sample std 0.1, t_{0.975, 2} = 4.302652729911275 (t table)
    m, h, n = d.mean_ci([0.1, 0.2, 0.3, np.nan])
    assert n == 3 and m == pytest.approx(0.2)
    assert h == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3), rel=1e-9)
    # 90% with 5 values: t_{0.95, 4} = 2.131846786326649
    v = [1.0, 2.0, 4.0, 8.0, 16.0]
    m, h, _ = d.mean_ci(v, confidence=0.9)
    assert h == pytest.approx(2.131846786326649 * np.std(v, ddof=1) / math.sqrt(5), rel=1e-9)
    assert d.mean_ci([2.0])[:2] == (2.0, pytest.approx(math.nan, nan_ok=True))
    assert d.mean_ci([])[2] == 0
    with pytest.raises(ValueError, match="confidence"):
        d.mean_ci([1.0, 2.0], confidence=95)
