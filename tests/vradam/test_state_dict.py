"""Save / load: a restored optimizer continues bitwise in lockstep."""

from __future__ import annotations

import io

import pytest
import torch

from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam

TOTAL, SPLIT = 10, 4


def _optimizer(params, **kwargs):
    return VRAdam(
        [{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "beta3": 0.3}],
        lr=5e-2, beta3=2.0, alpha1=1.0, **kwargs,
    )


def _scheduler(opt):
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / 3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[3])


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("with_scheduler", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_restored_optimizer_continues_in_lockstep(foreach, with_scheduler):
    steady = make_params(seed=4, dtype=torch.float32)
    interrupted = clone_params(steady)
    opt_a = _optimizer(steady, foreach=foreach)
    opt_b = _optimizer(interrupted, foreach=foreach)
    sched_a = _scheduler(opt_a) if with_scheduler else None
    sched_b = _scheduler(opt_b) if with_scheduler else None

    for step in range(TOTAL):
        if step == SPLIT:
            saved = _roundtrip({
                "params": [p.detach() for p in interrupted],
                "optimizer": opt_b.state_dict(),
                "scheduler": sched_b.state_dict() if with_scheduler else None,
            })
            interrupted = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
            opt_b = _optimizer(interrupted, foreach=foreach)  # built as at the start,
            sched_b = _scheduler(opt_b) if with_scheduler else None  # then both loaded
            opt_b.load_state_dict(saved["optimizer"])
            if with_scheduler:
                sched_b.load_state_dict(saved["scheduler"])
            for k in range(2):  # telemetry travelled with the state dict
                for key, value in opt_a.telemetry(k).items():
                    assert torch.equal(opt_b.telemetry(k)[key], value)
        for params, opt, sched in ((steady, opt_a, sched_a), (interrupted, opt_b, sched_b)):
            fill_grads(params)
            opt.step()
            if sched is not None:
                sched.step()

    for p, q in zip(steady, interrupted):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])
        assert opt_b.state[q]["step"].device.type == "cpu"
    for k in range(2):
        assert opt_a.param_groups[k]["lr"] == opt_b.param_groups[k]["lr"]
        for key, value in opt_a.telemetry(k).items():
            assert torch.equal(opt_b.telemetry(k)[key], value)


def test_scheduler_drives_lr_and_eta_follows():
    params = make_params(seed=5)
    opt = VRAdam(params, lr=0.1, beta3=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6)
    for _ in range(5):
        fill_grads(params)
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        assert opt.telemetry()["eta"].item() == lr_used


def test_loading_a_different_gate_is_refused():
    params = make_params(seed=6)
    saved = _roundtrip(VRAdam(params, gate="gradient").state_dict())
    with pytest.raises(ValueError, match="gate"):
        VRAdam(params, gate="velocity").load_state_dict(saved)
