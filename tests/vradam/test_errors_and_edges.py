"""Bad input, and the edges of the step: closures, missing / sparse grads, bf16."""

from __future__ import annotations

import pytest
import torch

from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam, VRAdamReference, vradam_step

BAD_ARGUMENTS = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(beta3=-1.0), "beta3"),
    (dict(alpha1=-0.5), "alpha1"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(gate="momentum"), "gate"),
    (dict(norm_scope="layer"), "norm_scope"),
    (dict(power=0.0), "power"),
    (dict(power=-2.0), "power"),
    (dict(lr=float("nan")), "lr"),
]


@pytest.mark.parametrize("kwargs, name", BAD_ARGUMENTS)
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        VRAdam(make_params(), **kwargs)
    assert "allowed" in str(info.value)


def test_bad_per_group_hyperparameter_is_refused():
    params = make_params()
    with pytest.raises(ValueError, match="beta3"):
        VRAdam([{"params": params[:1]}, {"params": params[1:], "beta3": -1.0}])


def test_optimizer_wide_option_cannot_differ_per_group():
    params = make_params()
    with pytest.raises(ValueError, match="norm_scope.*optimizer-wide"):
        VRAdam([{"params": params[:1]}, {"params": params[1:], "norm_scope": "group"}])


def test_functional_refuses_unknown_impl_and_empty_call():
    with pytest.raises(ValueError, match="impl"):
        vradam_step([], gate="velocity", power=2.0, norm_scope="global", impl="nope")
    with pytest.raises(ValueError, match="at least one parameter"):
        vradam_step([], gate="velocity", power=2.0, norm_scope="global", impl="foreach")


def test_fused_needs_cuda_parameters():
    with pytest.raises((RuntimeError, ValueError), match="fused=True"):
        VRAdam(make_params(), fused=True)


def test_fused_and_foreach_exclude_each_other():
    with pytest.raises(ValueError, match="fused"):
        VRAdam(make_params(), fused=True, foreach=True)


def test_telemetry_index_is_checked():
    with pytest.raises(ValueError, match="group_index"):
        VRAdam(make_params()).telemetry(1)


@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_gradients_are_refused(foreach):
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    opt = VRAdam(embedding.parameters(), foreach=foreach)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        VRAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_telemetry_before_the_first_step():
    opt = VRAdam(make_params(), lr=3e-3)
    tel = opt.telemetry()
    assert tel["eta"].item() == pytest.approx(3e-3)
    assert tel["sq_norm"].item() == 0.0
    assert tel["clamped"].dtype == torch.bool and not tel["clamped"]
    assert all(t.dim() == 0 for t in tel.values())


@pytest.mark.parametrize("foreach", [False, True])
def test_closure_runs_with_gradients_enabled(foreach):
    params = make_params()
    opt = VRAdam(params, foreach=foreach)

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()  # fails if the closure ran under no_grad
        return loss

    before = [p.detach().clone() for p in params]
    loss = opt.step(closure)
    assert loss.requires_grad
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("foreach", [False, True])
def test_parameters_without_grad_are_skipped_like_adamw(foreach):
    params = make_params()
    twins = clone_params(params)
    opt = VRAdam(params, beta3=0.0, foreach=foreach)
    adamw = torch.optim.AdamW(twins, foreach=foreach)
    for step in range(4):
        for ps, o in ((params, opt), (twins, adamw)):
            fill_grads(ps)
            ps[1].grad = None
            if step == 2:
                ps[0].grad = None
            o.step()
    assert opt.state[params[1]] == {} == adamw.state[twins[1]]
    torch.testing.assert_close(params[1], twins[1], rtol=0, atol=0)  # untouched, no decay
    assert opt.state[params[0]]["step"].item() == adamw.state[twins[0]]["step"].item() == 3
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_no_gradient_at_all_leaves_everything_alone():
    params = make_params()
    opt = VRAdam(params)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_half_precision_parameters_gate_on_a_float32_norm(dtype, foreach):
    params = make_params(seed=9, dtype=torch.float64)
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    exact = VRAdamReference(params, lr=1e-2, beta3=5.0, alpha1=100.0)
    opt = VRAdam(low, lr=1e-2, beta3=5.0, alpha1=100.0, foreach=foreach)
    for _ in range(5):
        fill_grads(params)
        for p, q in zip(low, params):
            p.grad = q.grad.to(dtype)
        exact.step()
        opt.step()
        tel = opt.telemetry()
        assert tel["sq_norm"].dtype == tel["eta"].dtype == torch.float32
        torch.testing.assert_close(
            tel["sq_norm"].double(), exact.telemetry()["sq_norm"], rtol=2e-2, atol=0
        )
    for p, q in zip(low, params):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        torch.testing.assert_close(p.double(), q.detach(), rtol=2e-2, atol=2e-2)
