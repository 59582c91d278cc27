"""Derived quantities: small pure functions on metric Series (indexed by step).

Each function takes the Series that :func:`analysis.metric_series` returns (or
:meth:`analysis.Run.metric`) and computes one number or one curve whose value
can be checked by hand. Non-finite values (a diverged run logs ``inf``/``nan``)
are ignored unless stated otherwise.

Example:
    >>> import pandas as pd
    >>> sharp = pd.Series([10.0, 30.0, 41.0, 39.0], index=[0, 10, 20, 30])
    >>> first_crossing_step(sharp, 40.0), steps_above_threshold(sharp, 40.0, level=0.95)
    (20, 10)
    >>> loss_rise_fraction(pd.Series([3.0, 2.0, 2.5, 1.0, 1.5]))
    0.5
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _finite(s: pd.Series) -> pd.Series:
    s = pd.Series(s, dtype=float)
    return s[np.isfinite(s.to_numpy())]


def _align(values: pd.Series, reference: pd.Series | float) -> tuple[pd.Series, pd.Series]:
    """Two Series on their common steps; a number ``reference`` is broadcast."""
    values = pd.Series(values, dtype=float).sort_index()
    if np.isscalar(reference):
        return values, pd.Series(float(reference), index=values.index)
    reference = pd.Series(reference, dtype=float).sort_index()
    common = values.index.intersection(reference.index)
    return values.loc[common], reference.loc[common]


def sharpness_ratio(sharpness: pd.Series, threshold: pd.Series | float) -> pd.Series:
    """``sharpness / threshold`` on the steps where both were measured (1.0 = at the edge).

    >>> sharpness_ratio(pd.Series([20.0, 40.0], index=[0, 10]), 40.0).tolist()
    [0.5, 1.0]
    """
    s, t = _align(sharpness, threshold)
    return (s / t).rename("sharpness_ratio")


def first_crossing_step(sharpness: pd.Series, threshold: pd.Series | float, level: float = 1.0) -> int | None:
    """The first measured step with ``sharpness >= level * threshold``; None if it never gets there.

    ``level`` below 1 (e.g. 0.95) counts arriving near the edge, since the
    sharpness at the edge of stability hovers around the threshold.
    """
    if not level > 0:
        raise ValueError(f"level must be > 0, got {level}")
    ratio = sharpness_ratio(sharpness, threshold)
    above = ratio[ratio >= level]
    return int(above.index[0]) if len(above) else None


def steps_above_threshold(sharpness: pd.Series, threshold: pd.Series | float, level: float = 1.0) -> int:
    """Training steps spent with ``sharpness >= level * threshold``.

    The sharpness is held constant from one measurement to the next, so a
    measurement at step s_i that is above counts ``s_{i+1} - s_i`` steps; the
    last measurement closes the record and counts none. Measurements at steps
    0, 10, 20, 30 that are (below, above, above, below) give 20 steps.
    """
    if not level > 0:
        raise ValueError(f"level must be > 0, got {level}")
    ratio = sharpness_ratio(sharpness, threshold)
    if len(ratio) < 2:
        return 0
    steps = ratio.index.to_numpy()
    above = (ratio.to_numpy() >= level)[:-1]
    return int(np.sum(np.diff(steps)[above]))


def loss_rise_fraction(loss: pd.Series) -> float:
    """Fraction of consecutive steps where the loss went up: mean of ``loss[t+1] > loss[t]``.

    Gradient descent below the edge of stability lowers the loss every step
    (0.0); at the edge the loss rises on a sizeable fraction of steps. Pairs with a
    non-finite value are skipped; NaN when no pair is left.
    """
    values = pd.Series(loss, dtype=float).sort_index().to_numpy()
    diffs = np.diff(values)
    diffs = diffs[np.isfinite(diffs)]
    return float(np.mean(diffs > 0)) if len(diffs) else math.nan


def sign_flip_rate(values: pd.Series) -> float:
    """Fraction of consecutive pairs of opposite sign, e.g. of ``update_proj_top``.

    An update that bounces across the valley along the top eigenvector flips
    sign every step (rate 1.0); steady descent along it never does (0.0). Zeros and
    non-finite values are dropped first; NaN when fewer than two values remain.

    >>> sign_flip_rate(pd.Series([1.0, -2.0, 3.0, 4.0, -1.0]))
    0.75
    """
    v = _finite(values).sort_index().to_numpy()
    v = v[v != 0]
    if len(v) < 2:
        return math.nan
    return float(np.mean(np.sign(v[1:]) != np.sign(v[:-1])))


def mean_update_cos(update_cos: pd.Series) -> float:
    """Mean cosine between successive updates (near -1: zig-zag; near 1: steady direction)."""
    v = _finite(update_cos)
    return float(v.mean()) if len(v) else math.nan


def damping_ratio(eta: pd.Series, lr: pd.Series | float) -> pd.Series:
    """VRAdam's ``eta_t / lr``: 1 means no damping, ``1/(1+alpha1)`` the strongest (clamped).

    >>> damping_ratio(pd.Series([0.001, 0.0005]), 0.001).tolist()
    [1.0, 0.5]
    """
    e, r = _align(eta, lr)
    return (e / r).rename("eta_over_lr")


def clamp_fraction(vr_clamped: pd.Series) -> float:
    """Fraction of steps where VRAdam's gate was clamped (``vr_clamped`` = 1.0); NaN when none logged."""
    v = _finite(vr_clamped)
    return float(np.mean(v.to_numpy() >= 0.5)) if len(v) else math.nan


def smooth(series: pd.Series, method: str = "ema", alpha: float = 0.1, window: int = 10) -> pd.Series:
    """A smoothed copy of ``series``.

    ``method="ema"``: s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_{t-1} (non-finite
    x_t are skipped and keep s_{t-1}). ``method="rolling"``: the mean of the last
    ``window`` finite values (fewer at the start). ``method="centered"``: the
    mean over a window centred on each step (the time average a central flow
    predicts; fewer values at both ends).

    >>> smooth(pd.Series([0.0, 1.0, 1.0]), alpha=0.5).tolist()
    [0.0, 0.5, 0.75]
    >>> smooth(pd.Series([0.0, 2.0, 0.0, 2.0]), method="centered", window=3).tolist()
    [1.0, 0.6666666666666666, 1.3333333333333333, 1.0]
    """
    s = pd.Series(series, dtype=float).sort_index()
    s = s.where(np.isfinite(s.to_numpy()))
    if method == "ema":
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        return s.ewm(alpha=alpha, adjust=False, ignore_na=True).mean().ffill()
    if method in ("rolling", "centered"):
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        return s.rolling(int(window), min_periods=1, center=method == "centered").mean()
    raise ValueError(f"method must be 'ema', 'rolling' or 'centered', got {method!r}")


def steps_to_target(loss: pd.Series, target: float) -> int | None:
    """The first step with ``loss <= target``; None when the loss never gets there."""
    s = _finite(loss).sort_index()
    hit = s[s <= target]
    return int(hit.index[0]) if len(hit) else None


def mean_ci_rows(matrix, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row by row, over each row's finite entries: the mean, the Student-t half-width, and n.

    half = t_{(1+confidence)/2, n-1} * std(ddof=1) / sqrt(n), the one interval of
    the analysis (:func:`mean_ci`, the comparison tables, the bands of
    :func:`analysis.plots.plot_comparison`); NaN where n < 2, and the mean NaN where n = 0.

    >>> mean, half, n = mean_ci_rows([[1.0, 2.0, 3.0], [4.0, float("nan"), 4.0]])
    >>> mean.tolist(), half.round(4).tolist(), n.tolist()   # t_{0.975, 2} = 4.3027; std 1, then 0
    ([2.0, 4.0], [2.4841, 0.0], [3, 2])
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy import stats

    matrix = np.asarray(matrix, dtype=float)
    finite = np.isfinite(matrix)
    n = finite.sum(axis=1)
    mean = np.where(n > 0, np.where(finite, matrix, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)
    centred = np.where(finite, matrix - mean[:, None], 0.0)
    std = np.sqrt((centred ** 2).sum(axis=1) / np.maximum(n - 1, 1))
    t = stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1))
    half = np.where(n >= 2, t * std / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, half, n


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the Student-t confidence interval, and n, over the finite values (:func:`mean_ci_rows`).

    >>> m, h, n = mean_ci([1.0, 2.0, 3.0])
    >>> m, round(h, 4), n       # t_{0.975, 2} = 4.3027, std = 1
    (2.0, 2.4841, 3)
    """
    mean, half, n = mean_ci_rows(np.asarray(values, dtype=float).reshape(1, -1), confidence)
    return float(mean[0]), float(half[0]), int(n[0])
