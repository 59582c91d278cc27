"""The GFlowNet task against exact enumeration: rewards, log Z, terminal distributions, balanced objectives."""

import math

import pytest
import torch
from torch import nn

from eos_toolkit.metrics import is_timing_metric
from eos_toolkit.record import read_run
from eos_toolkit.tracker import SharpnessTracker
from experiments.config import RunConfig
from experiments.resolve import resolve
from experiments.tasks.gflownet import (
    HyperGrid,
    TrajectoryObjective,
    distribution_distances,
    exact_terminal_distribution,
    objective_loss,
    sample_trajectories,
    terminal_states,
)
from experiments.train import resume, train

DT = torch.float64


def test_reward_table_and_log_z_by_hand():
    env = HyperGrid(2, 4, 0.1, 0.5, 2.0)
    # |x/3 - 0.5| = 0.5, 1/6, 1/6, 0.5: the outer band (0.25, 0.5] holds 0 and 3, the inner (0.3, 0.4) nothing.
    table = {(x, y): 0.1 + 0.5 * (x in (0, 3) and y in (0, 3)) for x in range(4) for y in range(4)}
    got = env.log_reward(env.states, DT).exp()
    for i, (x, y) in enumerate(env.states.tolist()):
        assert got[i] == pytest.approx(table[(x, y)])
    assert env.true_log_z() == pytest.approx(math.log(sum(table.values())))
    big = HyperGrid(2, 8, 1e-3, 0.5, 2.0)
    # |x/7 - 0.5| for x = 1 is 5/14 = 0.357: both bands; for x = 2, 3/14 = 0.214: neither.
    reward = big.log_reward(torch.tensor([[1, 6], [1, 2], [0, 7]]), DT).exp()
    assert reward.tolist() == pytest.approx([1e-3 + 0.5 + 2.0, 1e-3, 1e-3 + 0.5])
    assert int(big.modes().sum()) == 4  # (1|6, 1|6)


def brute_force_terminal_distribution(env: HyperGrid, log_pf: torch.Tensor) -> dict:
    """Every trajectory enumerated by recursion, its probability the product of its actions'."""
    out = {}

    def walk(state: tuple, prob: float):
        row = log_pf[env.index(torch.tensor(state))].exp()
        out[state] = out.get(state, 0.0) + prob * float(row[-1])
        for d in range(env.ndim):
            if state[d] < env.height - 1:
                child = list(state)
                child[d] += 1
                walk(tuple(child), prob * float(row[d]))

    walk(tuple([0] * env.ndim), 1.0)
    return out


def test_dp_terminal_distribution_against_enumeration_and_sampling():
    env = HyperGrid(2, 4, 0.1, 0.5, 2.0)
    torch.manual_seed(0)
    model = TrajectoryObjective(env, "tb", "uniform", hidden=(16,)).double()
    exact = exact_terminal_distribution(model)
    enumerated = brute_force_terminal_distribution(env, model.heads(env.states)[0].detach())
    for i, state in enumerate(env.states.tolist()):
        assert float(exact[i]) == pytest.approx(enumerated[tuple(state)], rel=1e-12)
    assert float(exact.sum()) == pytest.approx(1.0, rel=1e-12)
    n = 20_000
    states, actions = sample_trajectories(model, n, torch.Generator().manual_seed(1))
    counts = torch.bincount(env.index(terminal_states(states, actions)), minlength=env.n_states).double() / n
    tolerance = 5 * (exact * (1 - exact) / n).sqrt() + 1e-4  # five standard errors per state
    assert ((counts - exact).abs() <= tolerance).all()


def test_sampled_trajectories_are_valid_and_end_in_one_stop():
    env = HyperGrid(3, 3, 0.1, 0.5, 2.0)
    torch.manual_seed(0)
    model = TrajectoryObjective(env, "tb", "uniform", hidden=(8,))
    states, actions = sample_trajectories(model, 500, torch.Generator().manual_seed(0), epsilon=0.5)
    D = env.ndim
    assert int(states.max()) <= env.height - 1 and int(states.min()) >= 0  # never past the boundary
    stops = (actions == D).sum(1)
    assert (stops == 1).all()  # every trajectory stops once
    for i in range(len(actions)):
        at = int((actions[i] == D).nonzero())
        assert (actions[i, at + 1:] == -1).all() and (states[i, at + 1:] == states[i, at]).all()
        moves = actions[i, :at]
        assert ((states[i, 1:at + 1] - states[i, :at]) == nn.functional.one_hot(moves, D)).all()
    corner = torch.full((1, D), env.height - 1)
    assert env.forward_mask(corner).tolist() == [[False] * D + [True]]  # at the corner only stop is valid
    assert (terminal_states(states, actions) == corner).all(1).any()  # and trajectories do stop there


class TableTrunk(nn.Module):
    """A lookup table of outputs per state, read from the state's one-hot encoding."""

    def __init__(self, env: HyperGrid, table: torch.Tensor):
        super().__init__()
        self.env, self.table = env, nn.Parameter(table)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        coords = one_hot.unflatten(-1, (self.env.ndim, self.env.height)).argmax(-1)
        return self.table[self.env.index(coords)]


def balanced_flows(env: HyperGrid):
    """The flows that match R exactly under the uniform backward policy, by DP from the top level down."""
    R = env.log_reward(env.states, DT).exp()
    n_parents = env.backward_mask(env.states).sum(-1).clamp_min(1).double()
    flow = R.clone()
    for level in range(int(env.levels.max()), -1, -1):
        for i in (env.levels == level).nonzero().squeeze(1).tolist():
            for d in range(env.ndim):
                if env.states[i, d] < env.height - 1:
                    child = i + env.height ** d
                    flow[i] += flow[child] / n_parents[child]
    log_pf = torch.full((env.n_states, env.ndim + 1), -1e9, dtype=DT)
    edge = torch.full((env.n_states, env.ndim), -1e9, dtype=DT)
    for i in range(env.n_states):
        log_pf[i, -1] = math.log(R[i] / flow[i])
        for d in range(env.ndim):
            if env.states[i, d] < env.height - 1:
                child = i + env.height ** d
                edge[i, d] = math.log(flow[child] / n_parents[child])
                log_pf[i, d] = edge[i, d] - math.log(flow[i])
    return flow, log_pf, edge


@pytest.mark.parametrize("objective", ["tb", "db", "fm"])
def test_balanced_policy_has_zero_loss_and_a_perturbed_one_does_not(objective):
    env = HyperGrid(2, 4, 0.1, 0.5, 2.0)
    flow, log_pf, edge = balanced_flows(env)
    assert float(flow[0]) == pytest.approx(math.exp(env.true_log_z()), rel=1e-12)  # F(s0) = Z
    model = TrajectoryObjective(env, objective, "uniform", hidden=(4,)).double()
    table = {"tb": log_pf, "db": torch.cat([log_pf, flow.log().unsqueeze(1)], 1), "fm": edge}[objective]
    model.trunk = TableTrunk(env, table.clone())
    if objective == "tb":
        model.log_z.data.fill_(env.true_log_z())
    states, actions = sample_trajectories(model, 200, torch.Generator().manual_seed(0), epsilon=0.3)
    zeros = torch.zeros(actions.shape, dtype=DT)
    assert float(objective_loss(model(states, actions), zeros).detach()) < 1e-20
    assert float(model.estimated_log_z().detach()) == pytest.approx(env.true_log_z(), rel=1e-12)
    l1, kl = distribution_distances(exact_terminal_distribution(model), env.target())
    assert l1 < 1e-12 and abs(kl) < 1e-12
    with torch.no_grad():
        model.trunk.table[5, 0] += 0.3
    assert float(objective_loss(model(states, actions), zeros).detach()) > 1e-4


def test_tracked_sharpness_equals_the_dense_hessian_of_the_objective():
    env = HyperGrid(2, 3, 0.1, 0.5, 2.0)
    torch.manual_seed(0)
    for objective in ("tb", "db", "fm"):
        model = TrajectoryObjective(env, objective, "learned", hidden=(5,)).double()
        states, actions = sample_trajectories(model, 12, torch.Generator().manual_seed(2), epsilon=0.2)
        zeros = torch.zeros(actions.shape, dtype=DT)
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for _, p in model.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def loss_of(flat):
            parts = torch.split(flat, [s.numel() for s in shapes])
            params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
            return objective_loss(torch.func.functional_call(model, params, (states, actions)), zeros)

        exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, theta))[-1]
        batches = [((states[:5], actions[:5]), zeros[:5]), ((states[5:], actions[5:]), zeros[5:])]
        measured = SharpnessTracker(model, objective_loss, batches, tol=1e-10, max_iter=300).measure()
        assert measured["sharpness"] == pytest.approx(float(exact), rel=1e-6), objective


def tiny_gfn(**overrides) -> RunConfig:
    return RunConfig(**{"task": "gflownet", "ndim": 2, "height": 8, "device": "cpu", "track_every": 50,
                        "track_n": 16, "eval_n": 400, "model_options": {"hidden": [32, 32]}, **overrides})


@pytest.mark.parametrize("objective", ["db", "fm"])
def test_training_lowers_the_l1_distance(tmp_path, objective):
    train(tiny_gfn(objective=objective, steps=250, lr=3e-3), tmp_path / "run")
    run = read_run(tmp_path / "run")
    l1 = run.metrics[run.metrics.metric == "l1_exact"].set_index("step")["value"]
    assert l1.iloc[-1] < 0.5 * l1.iloc[0], l1.tolist()
    logged = set(run.metrics.metric)
    assert {"log_z", "log_z_true", "log_z_error", "kl_exact", "l1_empirical", "kl_empirical", "modes_found",
            "sharpness", "precond_sharpness", "trajectories_per_second"} <= logged
    assert run.environment["data"]["modes_total"] == 4


def test_kill_and_resume_a_gflownet_run(tmp_path):
    cfg = tiny_gfn(objective="tb", steps=30, track_every=10, eval_n=50)

    class Kill(BaseException):
        pass

    def kill(step, total):
        if step == 24:
            raise Kill()

    train(cfg, tmp_path / "whole")
    with pytest.raises(Kill):
        train(cfg, tmp_path / "killed", on_step=kill)
    resume(tmp_path / "killed")
    whole, resumed = read_run(tmp_path / "whole"), read_run(tmp_path / "killed")
    a, b = (r.metrics[~r.metrics.metric.map(is_timing_metric)].sort_values(["step", "metric"]).reset_index(drop=True)
            for r in (whole, resumed))
    assert (a[["step", "metric"]] == b[["step", "metric"]]).all().all()
    assert a["value"].tolist() == b["value"].tolist()  # the empirical metrics too: the sample buffer resumed


def test_bad_gflownet_settings_are_named():
    from experiments.tasks import build_task

    for overrides, message in ((dict(objective="subtb"), "unknown objective 'subtb'; allowed: tb, db, fm"),
                               (dict(R0=0.0), "R0 must be > 0"),
                               (dict(height=100, ndim=4), "100000000 states is too many"),
                               (dict(epsilon=1.0), r"epsilon must be in \[0, 1\), got 1.0")):
        with pytest.raises(ValueError, match=message):
            build_task(resolve(tiny_gfn(**overrides)), torch.device("cpu"), torch.float32)


def test_trajectory_balance_puts_log_z_in_its_own_faster_group():
    from experiments.optim import build_optimizer, parameter_groups
    from experiments.tasks import build_task

    cfg = resolve(tiny_gfn(objective="tb", lr=1e-3, log_z_lr_factor=100.0))
    task = build_task(cfg, torch.device("cpu"), torch.float32)
    optimizer = build_optimizer(cfg, task.param_groups(parameter_groups(task.model, cfg)))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 0.1])
    assert optimizer.param_groups[1]["params"] == [task.model.log_z]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(task.model.parameters()))
    db = resolve(tiny_gfn(objective="db"))
    assert len(build_optimizer(db, build_task(db, torch.device("cpu"), torch.float32).param_groups(
        parameter_groups(build_task(db, torch.device("cpu"), torch.float32).model, db))).param_groups) == 1
