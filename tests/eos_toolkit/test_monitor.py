"""The monitor in a plain loop: what it records against dense Hessians, its record, its state, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from eos_toolkit import metrics as names
from eos_toolkit.adapters import adapter_for
from eos_toolkit.monitor import EoSMonitor, NoAdapterWarning
from eos_toolkit.record import RunLock, RunLockedError, read_run
from tests.eos_toolkit.reference import DT, dense_hessian, regression_data, tanh_mlp
from vradam import VRAdam

mse = nn.functional.mse_loss


def train(monitor, model, optimizer, x, y, steps: int) -> dict:
    """A plain loop: the monitor after each optimizer step; the last measurement returned."""
    measured = {}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        optimizer.step()
        measured = monitor.step(loss) or measured
    return measured


def dense_sharpness(model, x, y, P=None) -> float:
    """lambda_max of H, or of P^-1/2 H P^-1/2, from the dense float64 Hessian of the same loss."""
    H = dense_hessian(model, mse, x, y)
    if P is not None:
        s = P.rsqrt()
        H = s[:, None] * H * s[None, :]
    return float(torch.linalg.eigvalsh(H)[-1])


@pytest.mark.parametrize("optimizer", ["adam", "vradam"])
def test_a_plain_loop_records_what_dense_hessians_say(tmp_path, optimizer):
    model = tanh_mlp()
    x, y = regression_data(24, 5, 3)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam"
           else VRAdam(model.parameters(), lr=1e-2, beta3=5.0, weight_decay=0.0))
    initial = dense_sharpness(model, x, y)
    monitor = EoSMonitor(model, opt, mse, [(x[:12], y[:12]), (x[12:], y[12:])], every=4, tol=1e-10,
                         max_iter=200, out=tmp_path / "run")
    start = monitor.start()
    measured = train(monitor, model, opt, x, y, steps=8)
    monitor.close()
    P = adapter_for(opt).preconditioner(opt, list(model.parameters()))
    assert start[names.SHARPNESS] == pytest.approx(initial, rel=1e-8) and names.PRECOND_SHARPNESS not in start
    assert measured[names.SHARPNESS] == pytest.approx(dense_sharpness(model, x, y), rel=1e-8)
    assert measured[names.PRECOND_SHARPNESS] == pytest.approx(dense_sharpness(model, x, y, P), rel=1e-8)
    assert measured[names.split_metric(names.TRACK, "loss")] == pytest.approx(float(mse(model(x), y).detach()), rel=1e-12)
    beta1 = opt.param_groups[0]["betas"][0]
    assert measured[names.PRECOND_THRESHOLD] == pytest.approx(2 * (1 + beta1) / ((1 - beta1) * 1e-2))

    run = read_run(tmp_path / "run")
    assert run.status == "finished" and run.config["optimizer"] == optimizer
    m = run.metrics
    assert sorted(m[m.metric == names.SHARPNESS].step) == [0, 4, 8]
    assert sorted(m[m.metric == names.TRAIN_LOSS].step) == list(range(8))
    assert sorted(m[m.metric == names.UPDATE_COS].step) == list(range(1, 8))
    if optimizer == "vradam":  # the gate, and the line at its rate
        assert {names.VR_SQ_NORM, names.VR_CLAMPED, names.at_eta(names.PRECOND_THRESHOLD)} <= set(m.metric)
        eta = m[m.metric == names.ETA].value
        assert (eta < 1e-2).all() and (eta > 1e-2 / 11).all()


def test_the_updates_it_records_are_the_loops_own(tmp_path):
    """update_norm is |theta_{t+1} - theta_t| and update_cos the cosine of successive updates, by hand."""
    model = tanh_mlp()
    x, y = regression_data(16, 5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = EoSMonitor(model, opt, mse, [(x, y)], every=100)
    snapshots = [torch.cat([p.detach().reshape(-1) for p in model.parameters()])]
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        monitor.step()
        snapshots.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    rows = {(s, m): v for s, m, v in monitor.flush()}
    updates = [b - a for a, b in zip(snapshots, snapshots[1:])]
    for t, u in enumerate(updates):
        assert rows[(t, names.UPDATE_NORM)] == pytest.approx(float(u.norm()), rel=1e-12)
    cos = float(updates[2] @ updates[1] / (updates[2].norm() * updates[1].norm()))
    assert rows[(2, names.UPDATE_COS)] == pytest.approx(cos, rel=1e-12)
    assert (0, names.TRAIN_LOSS) not in rows  # the loop passed no loss


def test_a_resumed_monitor_continues_warm_and_its_record_continues(tmp_path):
    model = tanh_mlp()
    x, y = regression_data(24, 5, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = EoSMonitor(model, opt, mse, [(x, y)], every=4, out=tmp_path / "run")
    first.start()
    train(first, model, opt, x, y, steps=6)
    state = first.state_dict()  # writes what is buffered: steps 4 and 5 are in the record
    first.writer.close()  # the process ends here
    assert read_run(tmp_path / "run").metrics.step.max() == 5
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))

    resumed = EoSMonitor(model, opt, mse, [(x, y)], every=4, out=tmp_path / "run", state=state)
    warm = train(resumed, model, opt, x, y, steps=2)
    resumed.close()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    cold_monitor = EoSMonitor(model, opt, mse, [(x, y)], every=4, method=resumed.tracker.hessian.method)
    cold_monitor.step_count = 6
    cold = train(cold_monitor, model, opt, x, y, steps=2)
    assert warm[names.SHARPNESS] == pytest.approx(cold[names.SHARPNESS], rel=1e-6)
    assert warm[names.matvecs(names.HESSIAN)] < cold[names.matvecs(names.HESSIAN)]
    run = read_run(tmp_path / "run")
    assert [e["event"] for e in run.events] == ["started", "hvp_method", "resumed", "finished"]
    sharp = run.metrics[run.metrics.metric == names.SHARPNESS]
    assert sharp.step.tolist() == [0, 4, 8]


def test_an_optimizer_without_an_adapter_gets_plain_sharpness_and_one_warning():
    model = tanh_mlp()
    x, y = regression_data(16, 5, 3)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-2)
    with pytest.warns(NoAdapterWarning, match="no stability adapter for NAdam.*plain sharpness only"):
        monitor = EoSMonitor(model, opt, mse, [(x, y)], every=2)
    measured = train(monitor, model, opt, x, y, steps=2)
    assert names.SHARPNESS in measured and not any("threshold" in k or k.startswith("precond") for k in measured)
    assert monitor.flush() == [] and math.isfinite(measured[names.SHARPNESS])


def test_bad_input_is_one_line_naming_the_value():
    model = tanh_mlp()
    x, y = regression_data(16, 5, 3)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"do not fit the model: .*input shapes \[\(16, 7\)\]"):
        EoSMonitor(model, opt, mse, [(torch.randn(16, 7, dtype=DT), y)])
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        EoSMonitor(model, opt, mse, [(x, y)], every=0)
    with pytest.raises(ValueError, match="batches is empty"):
        EoSMonitor(model, opt, mse, [])
    with pytest.raises(ValueError, match="precondition=True needs an optimizer with a preconditioner; SGD"):
        EoSMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, [(x, y)], precondition=True)


def test_a_record_another_process_writes_is_refused(tmp_path):
    model = tanh_mlp()
    x, y = regression_data(16, 5, 3)
    with RunLock(tmp_path / "run"):  # held as another writer would hold it
        with pytest.raises(RunLockedError, match="is being written by"):
            EoSMonitor(model, torch.optim.Adam(model.parameters()), mse, [(x, y)], out=tmp_path / "run")
