"""Three scalars, three steps, checked against the update written out in floats."""

from __future__ import annotations

import math

import pytest
import torch

from vradam import VRAdam

B1, B2, EPS, WD = 0.9, 0.99, 1e-8, 0.1
GROUPS = [  # (lr, beta3, alpha1) per group; group 0 holds x and y, group 1 holds z
    (0.1, 2.0, 3.0),
    (0.05, 0.5, 10.0),
]


def _grad(name: str, value: float) -> float:
    """Gradient of L = 1.5 x^2 + 2 y + 0.25 z^4."""
    return {"x": 3.0 * value, "y": 2.0, "z": value**3}[name]


def _by_hand(values: dict[str, float], steps: int):
    """The DESIGN.md update in plain Python floats, global norm over x, y, z."""
    group_of = {"x": 0, "y": 0, "z": 1}
    v = dict.fromkeys(values, 0.0)
    m = dict.fromkeys(values, 0.0)
    history = []
    for t in range(1, steps + 1):
        g = {k: _grad(k, values[k]) for k in values}
        for k in values:
            v[k] = B1 * v[k] + (1 - B1) * g[k]
            m[k] = B2 * m[k] + (1 - B2) * g[k] ** 2
        s = sum(vk**2 for vk in v.values())
        etas = [lr / (1 + min(beta3 * s, alpha1)) for lr, beta3, alpha1 in GROUPS]
        for k in values:
            eta = etas[group_of[k]]
            v_hat, m_hat = v[k] / (1 - B1**t), m[k] / (1 - B2**t)
            values[k] = values[k] * (1 - eta * WD) - eta * v_hat / (math.sqrt(m_hat) + EPS)
        clamped = [beta3 * s >= alpha1 for _, beta3, alpha1 in GROUPS]
        history.append((dict(values), s, etas, clamped))
    return history


@pytest.mark.parametrize("foreach", [False, True])
def test_first_three_steps_by_hand(foreach):
    start = {"x": 1.0, "y": -0.5, "z": 2.0}
    expected = _by_hand(dict(start), steps=3)
    x, y, z = (torch.nn.Parameter(torch.tensor(start[k], dtype=torch.float64)) for k in "xyz")
    opt = VRAdam(
        [
            {"params": [x, y], "lr": GROUPS[0][0], "beta3": GROUPS[0][1], "alpha1": GROUPS[0][2]},
            {"params": [z], "lr": GROUPS[1][0], "beta3": GROUPS[1][1], "alpha1": GROUPS[1][2]},
        ],
        betas=(B1, B2), eps=EPS, weight_decay=WD, foreach=foreach,
    )
    for values, s, etas, clamped in expected:
        opt.zero_grad()
        (1.5 * x**2 + 2 * y + 0.25 * z**4).backward()
        opt.step()
        for name, p in zip("xyz", (x, y, z)):
            assert p.item() == pytest.approx(values[name], rel=1e-12, abs=1e-14)
        for k in range(2):
            tel = opt.telemetry(k)
            assert tel["sq_norm"].item() == pytest.approx(s, rel=1e-12)
            assert tel["eta"].item() == pytest.approx(etas[k], rel=1e-12)
            assert bool(tel["clamped"]) is clamped[k]
    # the numbers take group 0 from free to capped and leave group 1 free
    assert [c[0] for *_, c in expected] == [False, True, True]
    assert not any(c[1] for *_, c in expected)
