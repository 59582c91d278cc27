"""Heavy-ball and Nesterov thresholds against torch.optim.SGD itself on a 1-D quadratic."""

import pytest
import torch

from eos_toolkit.thresholds import heavy_ball_threshold, nesterov_threshold


def final_distance(curvature: float, lr: float, beta: float, nesterov: bool, steps: int = 2000) -> float:
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr, momentum=beta, nesterov=nesterov)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x.pow(2)).sum().backward()
        opt.step()
    return x.abs().item()


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_stable_just_below_and_diverges_just_above(beta, nesterov):
    if nesterov and beta == 0.0:
        pytest.skip("Nesterov needs momentum > 0 in torch.optim.SGD")
    lr = 0.1
    threshold = (nesterov_threshold if nesterov else heavy_ball_threshold)(lr, beta)
    assert final_distance(0.98 * threshold, lr, beta, nesterov) < 1e-6
    assert final_distance(1.02 * threshold, lr, beta, nesterov) > 1e6


def test_closed_forms_and_errors():
    assert heavy_ball_threshold(0.1, 0.9) == pytest.approx(38.0)
    assert nesterov_threshold(0.1, 0.9) == pytest.approx(3.8 / 0.28)
    with pytest.raises(ValueError, match="lr must be > 0"):
        heavy_ball_threshold(0.0, 0.9)
    with pytest.raises(ValueError, match=r"beta1 must lie in \[0, 1\)"):
        nesterov_threshold(0.1, 1.0)
