"""Optimizer adapters against the optimizers' own steps, dense Hessians and quadratics.

The identity that defines an adapter: after a step with scheduled rate lr,
theta_{t+1} - theta_t = -rate * P^-1 * direction. Each case below takes real
steps with the torch (or VRAdam) optimizer and checks that identity to float64
rounding, so a wrong preconditioner or rate (RAdam treated as Adam, say) fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eos_toolkit.adapters import GatedAdam, adapter_for, adapter_for_class
from eos_toolkit.thresholds import gd_threshold, heavy_ball_threshold, momentum_threshold
from eos_toolkit.tracker import SharpnessTracker
from experiments.optim import optimizer_adapter
from experiments.optimizers import OPTIMIZERS, optimizer_class
from tests.eos_toolkit.reference import DT, dense_hessian, regression_data, tanh_mlp
from vradam import VRAdam

mse = nn.functional.mse_loss

CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "heavy_ball": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "heavy_ball_dampened": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6)),
    "rmsprop_centered": (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6, centered=True)),
    "rmsprop_momentum": (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, momentum=0.9)),
    "vradam": (VRAdam, dict(lr=1e-2, beta3=50.0, alpha1=10.0, weight_decay=0.0)),
    "vradam_gradient_gate": (VRAdam, dict(lr=1e-2, beta3=5.0, alpha1=10.0, weight_decay=0.0, gate="gradient")),
}


def steps(model, optimizer, x, y, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_next_step(optimizer, model, x, y, lr: float) -> None:
    before = flat(model)
    steps(model, optimizer, x, y, 1)
    taken = flat(model) - before
    predicted = adapter_for(optimizer).predicted_update(optimizer, list(model.parameters()), lr)
    assert torch.allclose(taken, predicted, rtol=1e-10, atol=1e-14), float((taken - predicted).abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_reproduces_the_optimizers_next_step(case):
    cls, kwargs = CASES[case]
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = cls(model.parameters(), **kwargs)
    steps(model, optimizer, x, y, 3)
    check_next_step(optimizer, model, x, y, kwargs["lr"])
    if cls is VRAdam:  # the gate must be active, so the check is about eta_t and not lr
        assert float(optimizer.telemetry()["eta"]) < 0.9 * kwargs["lr"]


def test_rmsprop_momentum_buffer_accumulates_the_preconditioned_gradient():
    """The direction P * buf alone would hold for any P: check P itself, buf_t - beta buf_{t-1} = g_t / P_t."""
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, momentum=0.9, eps=1e-6)
    steps(model, optimizer, x, y, 3)
    params = list(model.parameters())
    previous = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1).clone() for p in params])
    steps(model, optimizer, x, y, 1)
    buf = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1) for p in params])
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    P = adapter_for(optimizer).preconditioner(optimizer, params)
    assert torch.allclose(buf - 0.9 * previous, grad / P, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("t", [2, 5, 6, 8, 30])
def test_radam_through_its_untractable_and_rectified_phases(t):
    """RAdam steps with plain momentum while rho_t <= 5 (t <= 5 at beta2 = 0.999) and rectified after."""
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-2)
    steps(model, optimizer, x, y, t - 1)
    check_next_step(optimizer, model, x, y, 1e-2)


def test_radam_preconditioned_sharpness_against_dense():
    """At t = 8 RAdam's step is r_t lr m_hat / (sqrt(v_hat) + eps'): its sharpness is r_t times Adam's formula's."""
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-2)
    steps(model, optimizer, x, y, 8)
    beta1, beta2, eps, t = 0.9, 0.999, 1e-8, 8
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
    r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = (1 - beta1 ** t) * (v.sqrt() + eps) / (math.sqrt(1 - beta2 ** t) * r)  # from torch's RAdam step, by hand
    H = dense_hessian(model, mse, x, y)
    exact = float(torch.linalg.eigvalsh(H / torch.sqrt(torch.outer(P, P)))[-1])
    tracker = SharpnessTracker(model, mse, [(x, y)], precondition=True, tol=1e-10, max_iter=200)
    measured = tracker.measure(adapter_for(optimizer).preconditioner(optimizer, tracker.hessian.parameters))
    assert measured["precond_sharpness"] == pytest.approx(exact, rel=1e-8)
    P_adam = (1 - beta1 ** t) * ((v / (1 - beta2 ** t)).sqrt() + eps)
    as_adam = float(torch.linalg.eigvalsh(H / torch.sqrt(torch.outer(P_adam, P_adam)))[-1])
    assert r < 0.1 and exact == pytest.approx(r * as_adam, rel=1e-4)  # what treating RAdam as Adam got wrong


def test_groups_with_different_rates_fold_into_p():
    """Two groups, different lr (and VRAdam's per-group gate): one rate, the ratio folded into P."""
    model = tanh_mlp()
    x, y = regression_data(12, 5, 3)
    first, *rest = list(model.parameters())
    for cls, kwargs in ((torch.optim.Adam, {}), (VRAdam, dict(beta3=5.0, alpha1=10.0, weight_decay=0.0,
                                                                norm_scope="group"))):
        optimizer = cls([{"params": [first], "lr": 1e-2}, {"params": rest, "lr": 3e-3}], **kwargs)
        steps(model, optimizer, x, y, 3)
        check_next_step(optimizer, model, x, y, 1e-2)


def test_groups_that_need_different_thresholds_are_refused():
    model = tanh_mlp()
    first, *rest = list(model.parameters())
    adam = torch.optim.Adam([{"params": [first], "betas": (0.8, 0.999)}, {"params": rest}])
    with pytest.raises(ValueError, match=r"param group 1 has betas=\(0.9, 0.999\) but group 0 has \(0.8, 0.999\)"):
        adapter_for(adam)
    sgd = torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": rest, "lr": 0.2}])
    with pytest.raises(ValueError, match="param group 1 has lr=0.2"):
        adapter_for(sgd)


def test_unknown_optimizers_are_an_error_not_adams_formula():
    p = nn.Parameter(torch.ones(2))
    for optimizer in (torch.optim.NAdam([p]), torch.optim.Adamax([p])):
        with pytest.raises(ValueError, match=f"no stability adapter for {type(optimizer).__name__}"):
            adapter_for(optimizer)

    class MyAdam(torch.optim.Adam):  # a subclass may change the step: not inherited silently
        pass

    with pytest.raises(ValueError, match="no stability adapter for MyAdam"):
        adapter_for(MyAdam([p]))


def test_vradam_is_recognised_by_the_protocol_it_satisfies_not_by_its_class():
    """eos_toolkit never imports vradam: VRAdam (and its reference twin) are GatedAdam optimizers; torch's
    Adam is not, and an Adam subclass that only adds a telemetry method would be (it is then its author's
    claim that the step is AdamW's at the rate telemetry reports)."""
    import eos_toolkit.adapters as adapters
    from vradam import VRAdamReference

    assert issubclass(VRAdam, GatedAdam) and issubclass(VRAdamReference, GatedAdam)
    assert not issubclass(torch.optim.Adam, GatedAdam)
    assert adapter_for_class(VRAdam) is adapter_for_class(VRAdamReference)
    assert adapter_for_class(VRAdam).gated and adapter_for_class(VRAdam).preconditioned
    assert "vradam" not in adapters.__dict__ and not any("vradam" in str(v) for v in vars(adapters).values()
                                                          if isinstance(v, type(adapters)))


def test_every_offered_optimizer_has_an_adapter():
    for name in OPTIMIZERS:
        assert optimizer_adapter(name) is adapter_for_class(optimizer_class(name))
    assert {n for n in OPTIMIZERS if optimizer_adapter(n).preconditioned} == {"adam", "adamw", "rmsprop", "radam",
                                                                              "vradam"}


def test_missing_state_gives_no_preconditioner():
    model = tanh_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    assert adapter_for(optimizer).preconditioner(optimizer, list(model.parameters())) is None


def final_distance(make_optimizer, curvature: float, steps_: int = 3000) -> float:
    x = nn.Parameter(torch.tensor([1.0], dtype=DT))
    optimizer = make_optimizer([x])
    for _ in range(steps_):
        optimizer.zero_grad()
        (0.5 * curvature * x.pow(2)).sum().backward()
        optimizer.step()
    return x.detach().abs().item()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_threshold_against_rmsprop_itself(momentum):
    """RMSprop with alpha = 1 keeps v = 0, so P = eps exactly: lambda(P^-1 H) = curvature / eps.

    The adapter's threshold (heavy ball with momentum, 2/lr without) separates convergence from
    divergence; the EMA form 2(1+b)/((1-b) lr) would be 10x too high at 0.9.
    """
    lr, eps = 0.1, 0.5

    def make(params):
        return torch.optim.RMSprop(params, lr=lr, alpha=1.0, eps=eps, momentum=momentum)

    probe = make([nn.Parameter(torch.ones(1))])
    threshold = adapter_for(probe).threshold(probe, lr)
    assert threshold == pytest.approx(heavy_ball_threshold(lr, momentum) if momentum else gd_threshold(lr))
    assert final_distance(make, 0.98 * threshold * eps) < 1e-6
    assert final_distance(make, 1.02 * threshold * eps) > 1e6
    if momentum:
        assert momentum_threshold(lr, momentum) == pytest.approx(10 * threshold)


def test_dampened_heavy_ball_threshold_against_sgd_itself():
    lr, beta, d = 0.1, 0.9, 0.5

    def make(params):
        return torch.optim.SGD(params, lr=lr, momentum=beta, dampening=d)

    probe = make([nn.Parameter(torch.ones(1))])
    threshold = adapter_for(probe).threshold(probe, lr)
    assert threshold == pytest.approx(2 * (1 + beta) / ((1 - d) * lr))
    assert final_distance(make, 0.98 * threshold) < 1e-6
    assert final_distance(make, 1.02 * threshold) > 1e6


@pytest.mark.parametrize("name", ["adam", "adamw", "radam", "vradam"])
def test_adam_family_threshold_against_the_optimizer_on_a_quadratic(name):
    """The optimizer itself, on 0.5 lambda x^2, is stable just below the adapter's threshold and grows above it.

    With eps far above sqrt(v) (a start of 1e-40 keeps |g| << eps), beta2 = 0.9 (so RAdam's
    rectification and the bias corrections settle early) P is eps, the preconditioned curvature
    lambda / eps, and the edge sits at lambda = threshold * eps.
    """
    lr, eps, beta1 = 0.1, 1e3, 0.8

    def make(params):
        kwargs = dict(lr=lr, betas=(beta1, 0.9), eps=eps, weight_decay=0.0)
        if name == "vradam":
            kwargs.update(beta3=0.0)  # the gate off: eta_t = lr
        return optimizer_class(name)(params, **kwargs)

    probe = make([nn.Parameter(torch.ones(1))])
    threshold = adapter_for(probe).threshold(probe, lr)
    assert threshold == pytest.approx(2 * (1 + beta1) / ((1 - beta1) * lr))

    def distance(curvature: float) -> float:
        x = nn.Parameter(torch.tensor([1e-40], dtype=DT))
        optimizer = make([x])
        for _ in range(1500):
            optimizer.zero_grad()
            (0.5 * curvature * x.pow(2)).sum().backward()
            optimizer.step()
        return x.detach().abs().item()

    assert distance(0.97 * threshold * eps) < 1e-60
    assert distance(1.03 * threshold * eps) > 1e-10


def test_groups_whose_schedule_reached_zero_fold_without_dividing_by_it():
    """A linear decay to 0 leaves every group at lr 0 after the last step: equal rates fold as 1, and a group
    at 0 beside a moving group 0 gets an infinite P (it sets no bound), never a division error."""
    model = tanh_mlp()
    params = list(model.parameters())
    optimizer = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    x, y = regression_data(8, 5, 3)
    mse(model(x), y).backward()
    optimizer.step()
    unfolded = adapter_for(optimizer).preconditioner(optimizer, params)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    assert torch.equal(adapter_for(optimizer).preconditioner(optimizer, params), unfolded)
    optimizer.param_groups[0]["lr"] = 1e-2
    folded = adapter_for(optimizer).preconditioner(optimizer, params)
    n0 = sum(p.numel() for p in params[:2])
    assert torch.equal(folded[:n0], unfolded[:n0]) and torch.isinf(folded[n0:]).all()
