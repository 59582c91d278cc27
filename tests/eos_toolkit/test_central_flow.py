"""The central flow against closed forms, gradient descent written plainly, and the optimizers' own steps."""

import math

import pytest
import torch

from eos_toolkit.central_flow import EDGE_FRACTION, CentralFlow, FlowStartError
from eos_toolkit.flow_rules import (
    AdamFlow,
    GradientDescentFlow,
    RMSPropFlow,
    VRAdamFlow,
    flow_rule_for,
)
from eos_toolkit.hvp import hessian_operator
from vradam import VRAdam


class Sharpening(torch.nn.Module):
    """``L(x, y) = sum_i -c_i x_i + 1/2 (a_i + b_i x_i) y_i^2``: the sharpness along ``y_i`` grows with ``x_i``.

    At ``y = 0`` the Hessian is ``diag(0, a_i + b_i x_i)``, the gradient ``(-c, 0)``
    (gradient flow sharpens at rate ``eta c_i b_i``) and the gradient of the
    sharpness ``a_i + b_i x_i`` is ``b_i`` along ``x_i``.  Closed forms at the
    edge (threshold ``2/eta``): ``x_i* = (2/eta - a_i) / b_i``; holding it
    needs ``-c_i + 1/2 sigma_i^2 b_i = 0``, so ``sigma_i^2 = 2 c_i / b_i``, which
    is also ``y_i^2`` on gradient descent's period-two orbit (``1 - eta (a_i + b_i
    x_i*) = -1``, ``c_i = 1/2 b_i y_i^2``); the time-averaged loss there is
    ``sum_i -c_i x_i* + 1/2 (2/eta) sigma_i^2``.
    """

    def __init__(self, a, b, c, y0=0.0):
        super().__init__()
        self.a, self.b, self.c = (torch.tensor(v, dtype=torch.float64) for v in (a, b, c))
        self.x = torch.nn.Parameter(torch.zeros(len(a), dtype=torch.float64))
        self.y = torch.nn.Parameter(torch.full((len(a),), y0, dtype=torch.float64))

    def forward(self, inputs):
        value = -(self.c * self.x).sum() + 0.5 * ((self.a + self.b * self.x) * self.y ** 2).sum()
        return value.expand(inputs.shape[0])


def _mean(outputs, targets):
    return outputs.mean()


DATA = [(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))]


def _flow(model, rule, **kw):
    op = hessian_operator(model, _mean, DATA, method="double_backward", dtype=torch.float64)
    return CentralFlow(op, rule, generator=torch.Generator().manual_seed(0), **kw)


def test_gradient_descent_flow_holds_the_edge_with_the_closed_form_oscillation():
    a, b, c, eta = [10.0, 12.0], [5.0, 2.0], [1.0, 0.5], 0.1
    flow = _flow(Sharpening(a, b, c), GradientDescentFlow(eta), k=2, substeps=4)
    steps = [flow.step() for _ in range(140)]
    # each joins the edge at EDGE_FRACTION of the threshold, x_i = (0.975 (2/eta) - a_i) / b_i, i.e. at
    # t = x_i / (eta c_i): 19 and 75
    onsets = [next(s.t for s in steps if s.edge_count >= n) for n in (1, 2)]
    assert onsets == [pytest.approx((EDGE_FRACTION * 2 / eta - ai) / bi / (eta * ci), abs=1.01)
                      for ai, bi, ci in zip(a, b, c)]
    last = steps[-1]
    assert last.edge_count == 2
    assert last.eigenvalues == pytest.approx([20.0, 20.0], rel=1e-3)  # held at 2/eta
    assert sorted(last.variances) == pytest.approx(sorted([2 * 1.0 / 5.0, 2 * 0.5 / 2.0]), rel=1e-3)
    x_star = [(2 / eta - ai) / bi for ai, bi in zip(a, b)]
    predicted = sum(-ci * xi for ci, xi in zip(c, x_star)) + 0.5 * (2 / eta) * (0.4 + 0.5)
    assert last.predicted_loss == pytest.approx(predicted, rel=1e-3)
    assert last.third_derivatives == 4 * 3  # three pairs per substep


def test_the_flow_s_edge_point_is_a_period_two_orbit_of_gradient_descent():
    # Gradient descent written plainly, started at the flow's point with y^2 = its predicted variance,
    # flips y and keeps x: the predicted oscillation is the optimizer's own orbit.
    a, b, c, eta = [10.0], [5.0], [1.0], 0.1
    model = Sharpening(a, b, c)
    flow = _flow(model, GradientDescentFlow(eta), k=1)
    last = [flow.step() for _ in range(40)][-1]
    x, y = float(model.x.detach()), math.sqrt(last.variances[0])
    for t in range(50):
        x, y = x - eta * (-c[0] + 0.5 * b[0] * y * y), y - eta * (a[0] + b[0] * x) * y
        assert x == pytest.approx(float(model.x.detach()), abs=1e-4)
        assert y == pytest.approx((-1) ** (t + 1) * math.sqrt(last.variances[0]), rel=1e-3)
    losses = [-c[0] * x + 0.5 * (a[0] + b[0] * x) * y * y for y in (y, -y)]
    assert last.predicted_loss == pytest.approx(sum(losses) / 2, rel=1e-4)


def test_before_the_edge_the_flow_is_euler_gradient_flow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    plain = [p.detach().clone() for p in model.parameters()]
    op = hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)], dtype=torch.float64)
    flow = CentralFlow(op, GradientDescentFlow(0.01), k=1, substeps=3)
    for _ in range(5):
        assert flow.step().edge_count == 0
    for _ in range(15):  # five units of time, three substeps each, written plainly
        leaves = [p.clone().requires_grad_(True) for p in plain]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (x,))
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(out, y), leaves)
        plain = [p - (0.01 / 3) * g for p, g in zip(plain, grads)]
    for p, q in zip(model.parameters(), plain):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def _first_step(optimizer_factory, w0, loss_fn):
    w = torch.nn.Parameter(w0.clone())
    opt = optimizer_factory([w])
    loss_fn(w).backward()
    opt.step()
    return (w.detach() - w0), opt


@pytest.mark.parametrize("name", ["rmsprop", "adam", "adamw", "vradam"])
def test_the_flow_velocity_is_the_optimizer_s_own_first_step(name):
    # Before any oscillation, one unit of the flow's velocity at w_0 is the optimizer's first update.
    factories = {
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        "vradam": lambda p: VRAdam(p, lr=0.01, betas=(0.9, 0.999), beta3=50.0, alpha1=10.0, eps=1e-8,
                                   weight_decay=0.0),
    }
    w0 = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)

    def loss_fn(w):
        return (w ** 4).sum() / 4 + w[0] * w[1]

    update, opt = _first_step(factories[name], w0, loss_fn)
    rule = flow_rule_for(opt)
    g = torch.func.grad(loss_fn)(w0)
    state = rule.start(g)
    rate = rule.rate(state, float(g.square().sum()), 0.0)
    D = rule.denominator(state)
    torch.testing.assert_close(-rate * g / D, update, rtol=1e-12, atol=1e-15)
    if name == "vradam":
        assert rate == pytest.approx(float(opt.telemetry(0)["eta"]), rel=1e-12)
        assert rate < 0.01  # the gate is active at the start: the early dip of eta_t


def test_flow_rules_and_their_thresholds():
    p = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(flow_rule_for(torch.optim.SGD([p], lr=0.1)), GradientDescentFlow)
    assert type(flow_rule_for(torch.optim.RMSprop([p], lr=0.1))) is RMSPropFlow
    assert type(flow_rule_for(torch.optim.AdamW([p], lr=0.1, weight_decay=0.0))) is AdamFlow
    assert type(flow_rule_for(VRAdam([p], lr=0.1, weight_decay=0.0))) is VRAdamFlow
    assert flow_rule_for(torch.optim.SGD([p], lr=0.1)).threshold(0.1) == pytest.approx(20.0)
    assert flow_rule_for(torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.99))).threshold(0.1) == pytest.approx(
        2 * 1.8 / (0.2 * 0.1))


@pytest.mark.parametrize("optimizer, message", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "no central flow for SGD with momentum=0.9"),
    (lambda p: torch.optim.RMSprop(p, lr=0.1, centered=True), "centered=True"),
    (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad=True"),
    (lambda p: torch.optim.AdamW(p, lr=0.1), "no central flow with weight_decay=0.01"),
    (lambda p: torch.optim.NAdam(p, lr=0.1), "no central flow for NAdam"),
    (lambda p: VRAdam(p, lr=0.1, weight_decay=0.0, power=1.0), "power=1.0"),
])
def test_optimizers_without_a_flow_are_named(optimizer, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flow_rule_for(optimizer([torch.nn.Parameter(torch.zeros(2))]))


OPTIMIZERS = {  # (optimizer, real steps before the flow starts)
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99), 30),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.2, betas=(0.9, 0.999)), 20),
    "vradam": (lambda p: VRAdam(p, lr=0.2, betas=(0.9, 0.999), beta3=1.0, alpha1=10.0, weight_decay=0.0), 20),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adaptive_flows_hold_the_preconditioned_sharpness_at_their_threshold(name):
    # Started from the optimizer's own state after some steps (RMSProp's and Adam's first steps are far
    # above their thresholds), at beta1 = 0.9 for Adam and VRAdam (threshold 38 / rho: ten Euler micro
    # steps per interval keep the fast modes from overshooting).
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    make, warm_steps = OPTIMIZERS[name]
    optimizer = make(model.parameters())
    for _ in range(warm_steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    op = hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)], dtype=torch.float64)
    rule = flow_rule_for(optimizer)
    state = rule.state_from(optimizer, list(model.parameters()), op.loss_and_gradient()[1], warm_steps)
    flow = CentralFlow(op, rule, state=state, k=2, substeps=4, generator=torch.Generator().manual_seed(0))
    steps = [flow.step() for _ in range(30 if name != "rmsprop" else 20)]
    assert [s.t for s in steps[:2]] == [warm_steps, warm_steps + 1]
    at_edge = [s for s in steps if s.edge_count > 0]
    assert len(at_edge) > 10, "the flow never reached its threshold"
    ratios = [s.sharpness / s.threshold for s in at_edge[1:]]
    assert max(ratios) < 1.005 and min(ratios) > EDGE_FRACTION - 0.01
    assert all(s.variance > 0 for s in at_edge if s.sharpness > 0.99 * s.threshold)  # X = 0 until the margin is used up
    before = [s.loss for s in steps if s.t < at_edge[0].t]
    assert all(b < a for a, b in zip(before, before[1:])), "the flow's loss rose before the edge"
    assert all(math.isfinite(s.predicted_loss) and s.predicted_loss >= s.loss for s in steps)
    assert all(s.converged for s in steps)


def test_a_flow_above_its_threshold_does_not_start():
    # RMSProp's first step: nu = (1 - alpha) g^2 puts lambda_max(D^-1 H) far above 2 / rho.
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    op = hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)], dtype=torch.float64)
    flow = CentralFlow(op, RMSPropFlow(1e-2, alpha=0.99, eps=1e-8), k=1)
    with pytest.raises(FlowStartError, match=r"the flow starts above its threshold: .* is 6\.\d\d x tau/rho = 200"):
        flow.step()
