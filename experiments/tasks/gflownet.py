"""``gflownet``: a GFlowNet on the hypergrid, judged against its exact target distribution.

Environment (Bengio et al. 2021, "Flow network based generative models for
non-iterative diverse candidate generation"): states are the points of
{0..H-1}^D (``height`` H, ``ndim`` D); a trajectory starts at the origin, each
action increments one coordinate (allowed while it is below H-1) or stops,
and the state where it stops is the object generated. The reward is

    R(x) = R0 + R1 prod_d 1[0.25 < |x_d/(H-1) - 0.5| <= 0.5] + R2 prod_d 1[0.3 < |x_d/(H-1) - 0.5| < 0.4]

(R0 = 0.1, R1 = 0.5, R2 = 2.0 by default; R0 = 1e-3 is Malkin et al. 2022's
hard setting). The VRAdam paper's 8 x 8 grid world is ``ndim=2, height=8``;
its published code used a reward of its own, a non-standard objective and
per-optimizer reward temperatures, none of which this task reproduces: the
reward and objectives here are the standard ones, so results compare with the
GFlowNet literature.

Policy: an MLP (``model_options``: ``hidden``, default [256, 256], LeakyReLU)
on the one-hot encoding of the state (D one-hots of H); its heads give the
forward logits (invalid actions masked), and as the objective needs them a
learned log Z, a state flow log F(s), or backward logits (``backward_policy:
learned``; the default is uniform over the parents).

Objectives, each a pure function of a batch of trajectories (``objective``):

- ``tb``, trajectory balance (Malkin et al. 2022), per trajectory
  ``(log Z + sum_t log P_F(s_t+1|s_t) - log R(x) - sum_t log P_B(s_t|s_t+1))^2``
  (the stop action's log P_F included);
- ``db``, detailed balance (Bengio et al. 2023), per transition
  ``(log F(s) + log P_F(s'|s) - log F(s') - log P_B(s|s'))^2`` and, where the
  trajectory stops at x, ``(log F(x) + log P_F(stop|x) - log R(x))^2``;
- ``fm``, flow matching (Bengio et al. 2021; what the VRAdam paper reported),
  with the forward outputs as log edge flows and the flow into the sink from
  x equal to R(x): for every state s' a trajectory reaches,
  ``(log sum_{parents s} F(s->s') - log(R(s') + sum_{children s''} F(s'->s'')))^2``.

The loss of a batch is the mean over trajectories of the sum of its squared
residuals, so chunking by trajectories is exact. Training samples ``batch_size``
trajectories per step from the current forward policy (mixed with
``epsilon``-uniform exploration over valid actions; for ``fm`` the stop
action's weight is R(x)), from a generator seeded by (seed, step), so resume
is exact.

Tracking: the Hessian is that of the objective on ``track_n`` trajectories
sampled once, at the start, from the initial policy with a generator seeded
by the run's seed (recorded), so the tracked operator is a fixed function of
the parameters. (The on-policy loss's Hessian is not the Hessian of a fixed
function: its batch moves with the parameters.)

Metrics at every tracking step (exact, since the grid is small enough to
enumerate, up to about 10^5 states): ``track_loss`` (the objective on the
tracking trajectories), ``log_z`` (the model's estimate: learned log Z, log
F(s0), or the flow out of s0), ``log_z_true`` (log of the sum of rewards),
``log_z_error`` = |log_z - log_z_true|; ``l1_exact`` and ``kl_exact``: the
L1 distance sum_x |p(x) - R(x)/Z| (in [0, 2]) and KL(p || R/Z) for the
policy's exact terminal distribution p (dynamic programming over the DAG,
exploration off); ``l1_empirical`` and ``kl_empirical``: the same for the
empirical distribution of the last ``eval_n`` terminal states sampled in
training; ``modes_found``: how many of the states of the top reward level
training has visited so far (``modes_total`` of them exist).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eos_toolkit import metrics as names
from experiments.config import ConfigError, RunConfig
from experiments.tasks.base import Task, seeded_generator

OBJECTIVES = ("tb", "db", "fm")
BACKWARD_POLICIES = ("uniform", "learned")
_MASKED = -1e9  # a logit that no valid action has; exp() of it is 0 in float32 and float64


class HyperGrid:
    """The hypergrid {0..H-1}^D with the Bengio et al. reward; states are (..., D) integer tensors."""

    def __init__(self, ndim: int, height: int, R0: float, R1: float, R2: float, device=None):
        self.ndim, self.height, self.R = ndim, height, (R0, R1, R2)
        self.device = device
        self.n_states = height ** ndim
        self.strides = torch.tensor([height ** d for d in range(ndim)], device=device)
        self.states = self.unindex(torch.arange(self.n_states, device=device))  # index order
        self.levels = self.states.sum(-1)

    def index(self, states: torch.Tensor) -> torch.Tensor:
        return (states * self.strides).sum(-1)

    def unindex(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([(index // self.height ** d) % self.height for d in range(self.ndim)], -1)

    def log_reward(self, states: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        R0, R1, R2 = self.R
        u = (states.to(torch.float64) / (self.height - 1) - 0.5).abs()
        outer = ((u > 0.25) & (u <= 0.5)).all(-1).double()
        inner = ((u > 0.3) & (u < 0.4)).all(-1).double()
        return (R0 + R1 * outer + R2 * inner).log().to(dtype)

    def one_hot(self, states: torch.Tensor, dtype) -> torch.Tensor:
        return F.one_hot(states, self.height).to(dtype).flatten(-2)

    def forward_mask(self, states: torch.Tensor) -> torch.Tensor:
        """(..., D + 1): increment d allowed while x_d < H - 1; stop (the last) always."""
        moves = states < self.height - 1
        return torch.cat([moves, torch.ones_like(moves[..., :1])], -1)

    def backward_mask(self, states: torch.Tensor) -> torch.Tensor:
        """(..., D): the parent x - e_d exists when x_d > 0."""
        return states > 0

    def true_log_z(self) -> float:
        return float(torch.logsumexp(self.log_reward(self.states, torch.float64), 0))

    def target(self) -> torch.Tensor:
        """R(x) / Z over all states, in index order (float64)."""
        log_r = self.log_reward(self.states, torch.float64)
        return (log_r - torch.logsumexp(log_r, 0)).exp()

    def modes(self) -> torch.Tensor:
        """States of the top reward level (R0 + R1 + R2), as a boolean over the index order."""
        log_r = self.log_reward(self.states, torch.float64)
        return log_r >= log_r.max() - 1e-12


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(torch.where(mask, logits, torch.full_like(logits, _MASKED)), -1)


class TrajectoryObjective(nn.Module):
    """Policy network plus objective: ``forward(states, actions)`` gives each trajectory's residuals.

    ``states``: (B, T + 1, D) integer positions (padded by repeating the last);
    ``actions``: (B, T) with D for stop and -1 after it. The output is (B, T)
    residuals, zero at padded positions; the loss is
    ``(residuals ** 2).sum(1).mean()`` (:func:`objective_loss`).
    """

    def __init__(self, env: HyperGrid, objective: str, backward_policy: str, hidden=(256, 256)):
        super().__init__()
        self.env, self.objective, self.backward_policy = env, objective, backward_policy
        D = env.ndim
        self.n_forward = D if objective == "fm" else D + 1  # fm: edge flows of the moves; stop's flow is R
        self.n_backward = D if backward_policy == "learned" else 0
        self.n_flow = 1 if objective == "db" else 0
        layers, width = [], D * env.height
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU()]
            width = h
        layers.append(nn.Linear(width, self.n_forward + self.n_backward + self.n_flow))
        self.trunk = nn.Sequential(*layers)
        self.log_z = nn.Parameter(torch.zeros(())) if objective == "tb" else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.trunk.parameters()).dtype

    def heads(self, states: torch.Tensor):
        """Forward log-probabilities (..., D + 1), backward log-probabilities (..., D) and log F (...)."""
        out = self.trunk(self.env.one_hot(states, self.dtype))
        fwd = out[..., :self.n_forward]
        if self.objective == "fm":  # the stop edge carries R(x): P_F(a|s) is proportional to the edge flows
            fwd = torch.cat([fwd, self.env.log_reward(states, fwd.dtype).unsqueeze(-1)], -1)
        log_pf = _masked_log_softmax(fwd, self.env.forward_mask(states))
        bmask = self.env.backward_mask(states)
        if self.n_backward:
            log_pb = _masked_log_softmax(out[..., self.n_forward:self.n_forward + self.n_backward], bmask)
        else:
            log_pb = -bmask.sum(-1, keepdim=True).clamp_min(1).to(out.dtype).log().expand(bmask.shape)
        log_flow = out[..., -1] if self.n_flow else None
        return log_pf, log_pb, log_flow, out[..., :self.n_forward]

    def estimated_log_z(self) -> torch.Tensor:
        s0 = torch.zeros(1, self.env.ndim, dtype=torch.long, device=self.env.states.device)
        if self.objective == "tb":
            return self.log_z
        _, _, log_flow, edges = self.heads(s0)
        if self.objective == "db":
            return log_flow[0]
        mask = self.env.forward_mask(s0)[0, :-1]
        return torch.logsumexp(torch.cat([edges[0][mask], self.env.log_reward(s0, edges.dtype)]), 0)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        B, T = actions.shape
        D = self.env.ndim
        valid = actions >= 0
        moves = valid & (actions < D)
        stop = valid & (actions == D)
        safe = actions.clamp_min(0)
        log_pf, log_pb, log_flow, edges = self.heads(states)  # per state s_0..s_T
        pf = log_pf[:, :-1].gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # log P_F(a_t | s_t)
        # log P_B(s_t | s_t+1) for a move along d: the parent s_t+1 - e_d
        pb = log_pb[:, 1:].gather(-1, safe.clamp_max(D - 1).unsqueeze(-1)).squeeze(-1)
        log_r = self.env.log_reward(states, pf.dtype)  # (B, T + 1)
        zero = torch.zeros_like(pf)
        if self.objective == "tb":
            total = self.log_z + torch.where(valid, pf, zero).sum(1) - torch.where(moves, pb, zero).sum(1)
            terminal = (log_r[:, :-1] * stop).sum(1)  # R of the state where the trajectory stops
            return torch.cat([(total - terminal).unsqueeze(1), torch.zeros_like(pf[:, 1:])], 1)
        if self.objective == "db":
            move_res = log_flow[:, :-1] + pf - log_flow[:, 1:] - pb
            stop_res = log_flow[:, :-1] + pf - log_r[:, :-1]
            return torch.where(moves, move_res, torch.where(stop, stop_res, zero))
        # fm: for the state s' reached by each move, inflow from its parents against R(s') plus outflow
        reached = states[:, 1:]  # (B, T, D)
        eye = torch.eye(D, dtype=reached.dtype, device=reached.device)
        parents = (reached.unsqueeze(-2) - eye).clamp_min(0)  # (B, T, D, D): s' - e_d
        parent_edges = self.heads(parents)[3]  # (B, T, D, D): log F(parent_d -> .)
        into = parent_edges.diagonal(dim1=-2, dim2=-1)  # log F(s' - e_d -> s')
        inflow = torch.logsumexp(torch.where(self.env.backward_mask(reached), into, torch.full_like(into, _MASKED)),
                                 -1)
        out_mask = self.env.forward_mask(reached)[..., :-1]
        out_edges = torch.where(out_mask, edges[:, 1:], torch.full_like(edges[:, 1:], _MASKED))
        outflow = torch.logsumexp(torch.cat([out_edges, log_r[:, 1:].unsqueeze(-1)], -1), -1)
        return torch.where(moves, inflow - outflow, zero)


def objective_loss(residuals: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over trajectories of the sum of squared residuals (``targets`` are zeros of the same shape)."""
    return (residuals - targets).pow(2).sum(1).mean()


@torch.no_grad()
def sample_trajectories(model: TrajectoryObjective, n: int, generator: torch.Generator, epsilon: float = 0.0):
    """``n`` trajectories from the forward policy mixed with ``epsilon``-uniform exploration.

    Returns ``(states (n, T + 1, D), actions (n, T))`` padded as
    :class:`TrajectoryObjective` expects. Sampling draws on the CPU from
    ``generator``, so a (seed, step) generator gives the same trajectories on
    any device.
    """
    env = model.env
    device = env.states.device
    D = env.ndim
    state = torch.zeros(n, D, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    states, actions = [state], []
    for _ in range(D * (env.height - 1) + 1):
        log_pf = model.heads(state)[0].double()
        mask = env.forward_mask(state)
        probs = (1 - epsilon) * log_pf.exp() + epsilon * mask.double() / mask.sum(-1, keepdim=True)
        action = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        action = torch.where(done, torch.full_like(action, -1), action)
        step = F.one_hot(action.clamp(0, D - 1), D) * ((action >= 0) & (action < D)).unsqueeze(1)
        state = state + step
        actions.append(action)
        states.append(state)
        done = done | (action == D)
        if bool(done.all()):  # sync: one per step of the sampler
            break
    return torch.stack(states, 1), torch.stack(actions, 1)


def terminal_states(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The state where each trajectory stopped, (n, D)."""
    stop_at = (actions == states.shape[-1]).long().argmax(1)
    return states[torch.arange(len(states), device=states.device), stop_at]


@torch.no_grad()
def exact_terminal_distribution(model: TrajectoryObjective) -> torch.Tensor:
    """The forward policy's probability of stopping at each state (index order), by DP over the DAG."""
    env = model.env
    log_pf = model.heads(env.states)[0].double()
    prob = log_pf.exp()
    reach = torch.zeros(env.n_states, dtype=torch.float64, device=log_pf.device)
    reach[0] = 1.0  # the origin has index 0
    for level in range(int(env.levels.max()) + 1):  # every parent of a state is one level below it
        at = (env.levels == level).nonzero().squeeze(1)
        for d in range(env.ndim):
            can = env.states[at, d] < env.height - 1
            src = at[can]
            reach.index_add_(0, src + env.height ** d, reach[src] * prob[src, d])
    return reach * prob[:, -1]


def distribution_distances(p: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """L1 = sum |p - target| and KL(p || target) (target > 0 everywhere)."""
    positive = p > 0
    kl = float((p[positive] * (p[positive].log() - target[positive].log())).sum())
    return float((p - target).abs().sum()), kl


class GFlowNetTask(Task):
    """The hypergrid GFlowNet (module docstring)."""

    options = ("ndim", "height", "R0", "R1", "R2", "objective", "backward_policy", "epsilon", "log_z_lr_factor",
               "model_options", "batch_size", "track_n", "eval_n", "chunk_size", "steps")
    defaults = {"model": "mlp", "loss": "objective", "optimizer": "adam", "lr": 1e-3, "steps": 1000,
                "batch_size": 16, "track_n": 64, "eval_n": 2000, "chunk_size": 64, "track_every": 100,
                "full_batch": False}
    throughput_unit = "trajectories"
    every_parameter_used = False  # log Z only in trajectory balance, state flows only in db / fm
    model_options = "hidden ([256, 256])"

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        if cfg.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {cfg.objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if cfg.backward_policy not in BACKWARD_POLICIES:
            raise ConfigError(f"unknown backward_policy {cfg.backward_policy!r}; allowed: "
                              f"{', '.join(BACKWARD_POLICIES)}")
        if not (isinstance(cfg.ndim, int) and cfg.ndim >= 1 and isinstance(cfg.height, int) and cfg.height >= 2):
            raise ConfigError(f"ndim must be an integer >= 1 and height >= 2, got ndim={cfg.ndim!r}, "
                              f"height={cfg.height!r}")
        if cfg.height ** cfg.ndim > 200_000:
            raise ConfigError(f"height^ndim = {cfg.height ** cfg.ndim} states is too many to enumerate for the "
                              "exact metrics (at most 200,000)")
        if not (isinstance(cfg.log_z_lr_factor, (int, float)) and cfg.log_z_lr_factor > 0):
            raise ConfigError(f"log_z_lr_factor must be > 0, got {cfg.log_z_lr_factor!r}")
        if not 0 <= cfg.epsilon < 1:
            raise ConfigError(f"epsilon must be in [0, 1), got {cfg.epsilon!r}")
        if cfg.model != "mlp" or cfg.loss != "objective" or cfg.full_batch:
            raise ConfigError(f"gflownet trains model 'mlp' on its objective, on-policy (no full batch); got "
                              f"model={cfg.model!r}, loss={cfg.loss!r}, full_batch={cfg.full_batch!r}")
        for R in ("R0", "R1", "R2"):
            if not getattr(cfg, R) >= 0:
                raise ConfigError(f"{R} must be >= 0, got {getattr(cfg, R)!r}")
        if not cfg.R0 > 0:
            raise ConfigError(f"R0 must be > 0 (every state needs a positive reward), got {cfg.R0!r}")
        self.cfg = cfg
        self.env = HyperGrid(cfg.ndim, cfg.height, cfg.R0, cfg.R1, cfg.R2, device=device)
        options = dict(cfg.model_options)
        hidden = options.pop("hidden", [256, 256])
        if options:
            raise ConfigError(f"gflownet model has no option(s) {sorted(options)}; allowed: hidden")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = TrajectoryObjective(self.env, cfg.objective, cfg.backward_policy, tuple(hidden))
        self.model = model.to(device=device, dtype=dtype)
        states, actions = sample_trajectories(self.model, cfg.track_n, seeded_generator(cfg.seed, stream=1))
        self.track_batches = [((states[i:i + cfg.chunk_size], actions[i:i + cfg.chunk_size]),
                               torch.zeros(actions[i:i + cfg.chunk_size].shape, dtype=dtype, device=device))
                              for i in range(0, cfg.track_n, cfg.chunk_size)]
        self.splits = ("track",)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs
        self.items_per_step = cfg.batch_size
        self.target = self.env.target()
        self.is_mode = self.env.modes()
        self.log_z_true = self.env.true_log_z()
        # Training history the metrics need (checkpointed): the last eval_n terminal states, modes visited.
        self.recent = torch.full((cfg.eval_n,), -1, dtype=torch.long, device=device)
        self.n_seen = 0
        self.visited = torch.zeros(self.env.n_states, dtype=torch.bool, device=device)
        self.data_info = {"dataset": f"hypergrid-{cfg.ndim}x{cfg.height}", "dataset_requested": cfg.dataset,
                          "source": "generated: the hypergrid environment (no data files)",
                          "n_states": self.env.n_states, "log_z_true": self.log_z_true,
                          "modes_total": int(self.is_mode.sum()),
                          "log_z_lr": cfg.lr * cfg.log_z_lr_factor if cfg.objective == "tb" else None,
                          "tracking_trajectories": {"n": cfg.track_n, "sampler": "initial forward policy",
                                                    "generator": f"seeded_generator({cfg.seed}, stream=1)"}}

    @classmethod
    def resolve_data(cls, cfg) -> str:
        return f"hypergrid-{cfg.ndim}x{cfg.height}"

    def loss_fn(self, residuals, targets):
        return objective_loss(residuals, targets)

    def param_groups(self, groups: list) -> list:
        """Trajectory balance: log Z in a group of its own at ``log_z_lr_factor`` times the rate.

        The usual practice (Malkin et al. 2022: 0.1 for log Z, 1e-3 for the
        policy): a single scalar that must travel to log of the partition
        function learns too slowly at the policy's rate. The stability adapter
        folds the ratio of the rates into the preconditioner (Adam family);
        optimizers without one need a factor of 1.
        """
        factor = self.cfg.log_z_lr_factor
        if self.model.log_z is None or factor == 1:
            return groups
        log_z = self.model.log_z
        if not all(isinstance(g, dict) for g in groups):  # a plain list of tensors is one group
            groups = [{"params": list(groups)}]
        out = []
        for g in groups:
            kept = [p for p in g["params"] if p is not log_z]
            if kept:
                out.append({**g, "params": kept})
        return out + [{"params": [log_z], "lr": self.cfg.lr * factor, "weight_decay": 0.0}]

    def train_chunks(self, step: int):
        """This step's on-policy trajectories; their terminal states enter the empirical distribution."""
        cfg = self.cfg
        states, actions = sample_trajectories(self.model, cfg.batch_size, seeded_generator(cfg.seed, 0, step),
                                              cfg.epsilon)
        done = self.env.index(terminal_states(states, actions))
        slots = (self.n_seen + torch.arange(len(done), device=done.device)) % len(self.recent)
        self.recent[slots] = done
        self.n_seen += len(done)
        self.visited[done] = True
        targets = torch.zeros(actions.shape, dtype=self.model.dtype, device=actions.device)
        return [((states, actions), targets, 1.0)]

    def evaluate(self, split: str) -> dict[str, torch.Tensor]:
        loss = 0.0
        n = sum(len(y) for _, y in self.track_batches)
        with torch.no_grad():
            for (states, actions), targets in self.track_batches:
                loss = loss + self.loss_fn(self.model(states, actions), targets) * (len(targets) / n)
            log_z = self.model.estimated_log_z().double()
            l1_exact, kl_exact = distribution_distances(exact_terminal_distribution(self.model), self.target)
        seen = self.recent[self.recent >= 0]
        metrics = {names.split_metric(names.TRACK, "loss"): loss, "log_z": log_z,
                   "log_z_true": torch.tensor(self.log_z_true), "log_z_error": (log_z - self.log_z_true).abs(),
                   names.L1_EXACT: torch.tensor(l1_exact),
                   "kl_exact": torch.tensor(kl_exact),
                   "modes_found": (self.visited & self.is_mode).sum().double()}
        if len(seen):
            counts = torch.bincount(seen, minlength=self.env.n_states).double()
            l1, kl = distribution_distances(counts / counts.sum(), self.target)
            metrics.update({names.L1_EMPIRICAL: torch.tensor(l1), "kl_empirical": torch.tensor(kl)})
        return metrics

    def state_dict(self) -> dict:
        return {"recent": self.recent.clone(), "n_seen": self.n_seen, "visited": self.visited.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.recent.copy_(state["recent"])
        self.n_seen = int(state["n_seen"])
        self.visited.copy_(state["visited"])
