"""beta3 = 0 turns VRAdam into AdamW: compared with torch's own AdamW."""

from __future__ import annotations

import pytest
import torch

from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam, VRAdamReference

STEPS = 25


def _groups(params, maximize):
    first, second, third = params
    return [
        {"params": [first], "lr": 3e-2, "weight_decay": 0.1},
        {"params": [second], "lr": 1e-2, "betas": (0.8, 0.99), "maximize": maximize},
        {"params": [third], "lr": 5e-3, "eps": 1e-6},
    ]


def _vradam(params, path, maximize):
    kwargs = dict(beta3=0.0, alpha1=10.0, weight_decay=0.05)
    if path == "reference":
        return VRAdamReference(_groups(params, maximize), **kwargs)
    return VRAdam(_groups(params, maximize), foreach=(path == "foreach"), **kwargs)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("adamw_foreach", [False, True], ids=["adamw_forloop", "adamw_foreach"])
@pytest.mark.parametrize("path", ["single_tensor", "foreach", "reference"])
def test_beta3_zero_is_adamw(path, adamw_foreach, maximize):
    ours = make_params(seed=1)
    theirs = clone_params(ours)
    vr = _vradam(ours, path, maximize)
    adamw = torch.optim.AdamW(_groups(theirs, maximize), weight_decay=0.05, foreach=adamw_foreach)

    for _ in range(STEPS):
        fill_grads(ours)
        fill_grads(theirs)
        vr.step()
        adamw.step()

    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        s, t = vr.state[p], adamw.state[q]
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-12, atol=1e-14)
        assert s["step"].item() == t["step"].item() == STEPS
    for k, group in enumerate(vr.param_groups):
        assert vr.telemetry(k)["eta"].item() == group["lr"]  # exactly lr: no gate at beta3 = 0


def test_defaults_match_adamw_defaults():
    ours = make_params(seed=2)
    theirs = clone_params(ours)
    vr, adamw = VRAdam(ours, beta3=0.0), torch.optim.AdamW(theirs)
    for _ in range(5):
        fill_grads(ours)
        fill_grads(theirs)
        vr.step()
        adamw.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
