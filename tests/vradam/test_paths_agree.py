"""Reference vs single-tensor vs foreach: same params, state and telemetry."""

from __future__ import annotations

import pytest
import torch

from tests.vradam.helpers import clone_params, make_params, smooth_loss
from vradam import VRAdam, VRAdamReference

STEPS = 12
# (param index -> steps at which its grad is None); index 4 and 5 form group 1,
# so at step 6 group 1 has no gradient at all.
NO_GRAD_AT = {3: {2, 5, 6}, 4: {6}}


def _all_params():
    matrix, transposed, vector = make_params(seed=3)
    empty = torch.nn.Parameter(torch.zeros(0, 4, dtype=torch.float64))
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3))
    return [matrix, empty, transposed, vector, extra]


def _groups(params, alpha1=0.5):
    return [
        {"params": params[:3], "lr": 0.05, "beta3": 4.0, "alpha1": alpha1},
        {"params": params[3:], "lr": 0.02, "betas": (0.85, 0.995), "beta3": 0.5,
         "alpha1": 20.0, "weight_decay": 0.1, "eps": 1e-6},
    ]


def _make(path, params, gate, scope, power, alpha1):
    kwargs = dict(gate=gate, norm_scope=scope, power=power)
    if path == "reference":
        return VRAdamReference(_groups(params, alpha1), **kwargs)
    return VRAdam(_groups(params, alpha1), foreach=(path == "foreach"), **kwargs)


def _alpha1_crossed_mid_run(gate, scope, power):
    """A cap for group 0 that beta3 s_t crosses during the run, away from any tie."""
    params = _all_params()
    opt = _make("reference", params, gate, scope, power, alpha1=1e12)
    scaled = []
    for step in range(STEPS):
        _grads(params, step)
        opt.step()
        scaled.append(4.0 * opt.telemetry(0)["sq_norm"].item())
    low, high = sorted(scaled)[STEPS // 2 - 1 : STEPS // 2 + 1]
    return (low + high) / 2


def _grads(params, step):
    for p in params:
        p.grad = None
    smooth_loss(params).backward()
    for i, p in enumerate(params):
        if step in NO_GRAD_AT.get(i, ()):
            p.grad = None


@pytest.mark.parametrize("power", [2.0, 1.5])
@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("gate", ["velocity", "gradient"])
def test_paths_agree(gate, scope, power):
    base = _all_params()
    runs = {path: clone_params(base) for path in ("reference", "single_tensor", "foreach")}
    alpha1 = _alpha1_crossed_mid_run(gate, scope, power)
    opts = {path: _make(path, ps, gate, scope, power, alpha1) for path, ps in runs.items()}
    clamp_seen = set()

    for step in range(STEPS):
        for path, ps in runs.items():
            _grads(ps, step)
            opts[path].step()
        ref_ps, ref_opt = runs["reference"], opts["reference"]
        clamp_seen.add(bool(ref_opt.telemetry(0)["clamped"]))
        for path in ("single_tensor", "foreach"):
            ps, opt = runs[path], opts[path]
            for p, q in zip(ps, ref_ps):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
                assert p.stride() == q.stride()
                s, r = opt.state[p], ref_opt.state[q]
                assert s.keys() == r.keys()
                if s:
                    torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-12, atol=1e-14)
                    torch.testing.assert_close(
                        s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-12, atol=1e-14
                    )
                    assert s["step"].item() == r["step"].item()
            for k in range(2):
                for key in ("eta", "sq_norm", "clamped"):
                    torch.testing.assert_close(
                        opt.telemetry(k)[key], ref_opt.telemetry(k)[key], rtol=1e-12, atol=0
                    )

    assert clamp_seen == {True, False}, "the run must cover clamped and unclamped steps"
    # the parameter that skipped three steps counted only the steps it took
    assert opts["foreach"].state[runs["foreach"][3]]["step"].item() == STEPS - 3


def test_group_scope_differs_from_global_scope():
    """A sanity check that the scopes really compute different gates."""
    etas = {}
    for scope in ("global", "group"):
        params = _all_params()
        opt = VRAdam(_groups(params), norm_scope=scope)
        _grads(params, 0)
        opt.step()
        etas[scope] = (opt.telemetry(0)["sq_norm"], opt.telemetry(1)["sq_norm"])
    g0, g1 = etas["group"]
    torch.testing.assert_close(etas["global"][0], g0 + g1)
    torch.testing.assert_close(etas["global"][1], g0 + g1)
    assert g0 > 0 and g1 > 0
