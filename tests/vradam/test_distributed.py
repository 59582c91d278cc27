"""VRAdam on sharded parameters: two CPU ranks (gloo) against one process.

FSDP2 (``fully_shard``) runs on CPU with the gloo backend in this torch, so the
model tests shard a float64 MLP with it: the optimizer sees DTensor shards
(``Shard(0)``; uneven, rank 1's shards of the output layer are empty) whose
gradients FSDP has averaged over ranks. Other layouts (Shard(1), Replicate
DTensors and plain tensors side by side, 2-D and 3-D meshes) are built by hand
with ``distribute_tensor``: the same code path, the layouts FSDP + TP and
friends produce.

Each module fixture launches two ranks (a file store, no port; forked from
a forkserver that imports torch once) that run a batch of scenarios and save
what each rank saw; the tests compare it with the same optimizer stepped in
this process on the whole parameters, the independent answer, and, at
beta3 = 0, with ``torch.optim.AdamW``. A launch takes a few seconds, the
first one a few more (the forkserver's imports).

Tolerances: the distributed runs are not bitwise equal to the single process.
Gradients are averaged over ranks by FSDP (each rank's mean over its half
batch, then their mean) instead of one mean over the batch, and s_t is a sum of
per-shard sums, so additions happen in another order; each costs a few float64
roundings (~1e-16 relative), and ten Adam steps carry them along without
amplifying them much. Parameters, moments and telemetry are therefore checked
to rtol 1e-12, atol 1e-15 (atol 0 for telemetry). Observed: at most 3e-14
relative on a moment, 3e-15 on a parameter, 1e-15 on s_t and eta_t; the
hand-sharded runs, whose gradients need no averaging, match the parameters
bitwise. Dropping the all-reduce changes s_t by tens of percent and the
parameters by 1e-2 and more, which
:func:`test_without_the_all_reduce_the_result_differs` shows the checks catch.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import multiprocessing
import os
import unittest.mock
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vradam.distributed
from tests.vradam.helpers import smooth_loss
from vradam import VRAdam, VRAdamReference
from vradam.distributed import local_shards

WORLD = 2
STEPS = 10
RTOL, ATOL = 1e-12, 1e-15
HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

# Two param groups that differ in everything per-group, so that "group" scope matters.
GROUP_0 = dict(lr=0.05, beta3=4.0)  # alpha1 chosen per scenario: crossed mid-run
GROUP_1 = dict(lr=0.02, betas=(0.85, 0.995), beta3=0.5, alpha1=20.0, weight_decay=0.1, eps=1e-6)


# ------------------------------------------------------------------ problems


def _mlp(dtype: torch.dtype) -> torch.nn.Sequential:
    """3 -> 5 -> 1 with biases; the output layer's shards on rank 1 are empty."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).to(dtype)


def _batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _param_groups(model, alpha1: float) -> list[dict]:
    return [
        {"params": list(model[0].parameters()), **GROUP_0, "alpha1": alpha1},
        {"params": list(model[2].parameters()), **GROUP_1},
    ]


def _optimizer(groups, impl: str, options: dict):
    if "beta3" in options:  # the per-group values would override the default
        groups = [{**g, "beta3": options["beta3"]} for g in groups]
    if impl == "adamw":
        return torch.optim.AdamW(
            [{k: v for k, v in g.items() if k not in ("beta3", "alpha1")} for g in groups]
        )
    if impl == "reference":
        return VRAdamReference(groups, **options)
    return VRAdam(groups, foreach=impl == "foreach", fused=impl == "fused", **options)


def _manual_params(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Full values of the hand-sharded parameters: 5x3, 2x4, 3 and 4 entries."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(5, 3), (2, 4), (3,), (4,)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def _manual_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """smooth_loss's gradient: elementwise per parameter, so a shard's is the shard of the whole's."""
    return [2 * (k + 1) * (p - 0.3) + 3 * torch.cos(3 * p) for k, p in enumerate(params)]


def _manual_groups(params, alpha1: float) -> list[dict]:
    return [{"params": params[:2], **GROUP_0, "alpha1": alpha1}, {"params": params[2:], **GROUP_1}]


# ------------------------------------------------------------------ scenarios

FSDP_CASES = [
    (impl, gate, scope)
    for impl in ("single_tensor", "foreach")
    for gate in ("velocity", "gradient")
    for scope in ("global", "group")
] + [("reference", "velocity", "global"), ("reference", "gradient", "group")]

# mesh shape and, per hand-made parameter, its placements ("plain": not a DTensor)
MANUAL_LAYOUTS = {
    "1d": ((2,), [("S0",), ("S1",), ("R",), "plain"]),
    "fsdp+tp": ((1, 2), [("S0", "S1"), ("S0", "R"), ("R", "R"), "plain"]),
    "3d": ((1, 1, 2), [("S0", "R", "S1"), ("R", "R", "S0"), ("S0", "R", "R"), "plain"]),
}
EXPECTED_COLLECTIVES = {"1d": 1, "fsdp+tp": 1, "3d": 2}  # 3d: dims 0 and 2, not the whole mesh


def _fsdp_scenarios(alpha1s: dict) -> list[dict]:
    out = []
    for impl, gate, scope in FSDP_CASES:
        out.append(dict(name=f"fsdp-{impl}-{gate}-{scope}", kind="fsdp", mesh=(2,), impl=impl,
                        options=dict(gate=gate, norm_scope=scope), alpha1=alpha1s[gate, scope]))
    for mesh in ((2, 1), (1, 2)):  # HSDP: (Replicate, Shard); sum over the shard dimension only
        out.append(dict(name=f"hsdp-{mesh[0]}x{mesh[1]}", kind="fsdp", mesh=mesh, impl="foreach",
                        options=dict(gate="velocity", norm_scope="group"),
                        alpha1=alpha1s["velocity", "group"]))
    out.append(dict(name="fsdp-adamw-twin", kind="fsdp", mesh=(2,), impl="foreach",
                    options=dict(beta3=0.0), alpha1=10.0))
    out.append(dict(name="fsdp-adamw", kind="fsdp", mesh=(2,), impl="adamw", options={},
                    alpha1=10.0))
    out.append(dict(name="fsdp-dropped-reduce", kind="fsdp", mesh=(2,), impl="foreach",
                    options=dict(gate="velocity", norm_scope="global"),
                    alpha1=alpha1s["velocity", "global"], drop_reduce=True))
    return out


def _layout_scenarios(alpha1s: dict) -> list[dict]:
    return [
        dict(name=f"manual-{layout}-{impl}", kind="manual", layout=layout, impl=impl,
             options=dict(gate="velocity", norm_scope="group"), alpha1=alpha1s["manual"])
        for layout in MANUAL_LAYOUTS for impl in ("single_tensor", "foreach")
    ]


def _fused_scenarios(alpha1s: dict) -> list[dict]:
    """float32 (the kernels refuse float64); 4 steps, since the interpreter is slow."""
    return [
        dict(name="fsdp-fused", kind="fsdp", mesh=(2,), impl="fused", steps=4,
             options=dict(gate="velocity", norm_scope="global"),
             alpha1=alpha1s["velocity", "global"], dtype=torch.float32),
        dict(name="manual-1d-fused", kind="manual", layout="1d", impl="fused", steps=4,
             options=dict(gate="velocity", norm_scope="group"), alpha1=alpha1s["manual"],
             dtype=torch.float32),
    ]


# ------------------------------------------------------------ single process


def _single_process_fsdp(scenario: dict) -> dict:
    """The same model, data and optimizer in one process, on whole tensors."""
    dtype = scenario.get("dtype", torch.float64)
    model = _mlp(dtype)
    x, y = _batch(dtype)
    impl = "foreach" if scenario["impl"] == "fused" else scenario["impl"]
    opt = _optimizer(_param_groups(model, scenario["alpha1"]), impl, scenario["options"])
    telemetry = []
    for _ in range(scenario.get("steps", STEPS)):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if isinstance(opt, VRAdam):
            telemetry.append([dict(opt.telemetry(k)) for k in range(2)])
    params = [p.detach() for p in model.parameters()]
    return dict(params=params, telemetry=telemetry,
                exp_avg=[opt.state[p]["exp_avg"] for p in model.parameters()],
                exp_avg_sq=[opt.state[p]["exp_avg_sq"] for p in model.parameters()])


def _single_process_manual(scenario: dict) -> dict:
    params = [torch.nn.Parameter(p) for p in _manual_params(scenario.get("dtype", torch.float64))]
    impl = "foreach" if scenario["impl"] == "fused" else scenario["impl"]
    opt = _optimizer(_manual_groups(params, scenario["alpha1"]), impl, scenario["options"])
    telemetry = []
    for _ in range(scenario.get("steps", STEPS)):
        for p in params:
            p.grad = None
        smooth_loss(params).backward()  # autograd here, the closed form on the ranks
        opt.step()
        telemetry.append([dict(opt.telemetry(k)) for k in range(2)])
    return dict(params=[p.detach() for p in params], telemetry=telemetry,
                exp_avg=[opt.state[p]["exp_avg"] for p in params],
                exp_avg_sq=[opt.state[p]["exp_avg_sq"] for p in params])


def _crossing_alpha1(run) -> float:
    """A cap for group 0 that beta3 s_t crosses mid-run, away from any tie."""
    scaled = sorted(GROUP_0["beta3"] * step[0]["sq_norm"].item() for step in run["telemetry"])
    return (scaled[STEPS // 2 - 1] + scaled[STEPS // 2]) / 2


def _alpha1s() -> dict:
    out = {}
    for gate in ("velocity", "gradient"):
        for scope in ("global", "group"):
            probe = dict(impl="foreach", options=dict(gate=gate, norm_scope=scope), alpha1=1e12)
            out[gate, scope] = _crossing_alpha1(_single_process_fsdp(probe))
    probe = dict(impl="foreach", options=dict(gate="velocity", norm_scope="group"), alpha1=1e12)
    out["manual"] = _crossing_alpha1(_single_process_manual(probe))
    return out


# -------------------------------------------------------------------- ranks


def _placements(spec):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if s == "R" else Shard(int(s[1:])) for s in spec]


def _run_fsdp(scenario: dict, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dtype = scenario.get("dtype", torch.float64)
    mesh_shape = scenario["mesh"]
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = _mlp(dtype)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _batch(dtype)
    rows = slice(4 * rank, 4 * rank + 4)  # this rank's half; FSDP averages the two gradients
    opt = _optimizer(_param_groups(model, scenario["alpha1"]), scenario["impl"], scenario["options"])
    return _steps(opt, list(model.parameters()), scenario,
                  lambda: torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward())


def _run_manual(scenario: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh_shape, specs = MANUAL_LAYOUTS[scenario["layout"]]
    mesh = init_device_mesh("cpu", mesh_shape)
    params = [
        torch.nn.Parameter(full.clone() if spec == "plain"
                           else distribute_tensor(full, mesh, _placements(spec)))
        for full, spec in zip(_manual_params(scenario.get("dtype", torch.float64)), specs)
    ]

    def backward():
        locals_ = [p.to_local() if isinstance(p, DTensor) else p.detach() for p in params]
        for p, local_grad in zip(params, _manual_grads(locals_)):
            p.grad = (local_grad if not isinstance(p, DTensor) else DTensor.from_local(
                local_grad, mesh, p.placements, shape=p.shape, stride=p.stride()))

    opt = _optimizer(_manual_groups(params, scenario["alpha1"]), scenario["impl"], scenario["options"])
    return _steps(opt, params, scenario, backward)


def _steps(opt, params, scenario, backward) -> dict:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    drop = unittest.mock.patch.object(
        vradam.distributed, "all_reduce_sums", lambda local_sums, process_groups: local_sums
    ) if scenario.get("drop_reduce") else contextlib.nullcontext()
    telemetry, collectives = [], []
    with drop:
        for _ in range(scenario.get("steps", STEPS)):
            opt.zero_grad()
            backward()
            with CommDebugMode() as comm:  # counts c10d and DTensor collectives in the step only
                opt.step()
            collectives.append(comm.get_total_counts())
            if isinstance(opt, VRAdam):
                telemetry.append([{k: v.clone() for k, v in opt.telemetry(g).items()} for g in range(2)])
    state = [opt.state[p] for p in params]
    return dict(
        params=[full(p) for p in params],
        exp_avg=[full(s["exp_avg"]) for s in state],
        exp_avg_sq=[full(s["exp_avg_sq"]) for s in state],
        state_placements=[
            (s["exp_avg"].placements == p.placements) if isinstance(p, DTensor) else None
            for p, s in zip(params, state)
        ],
        telemetry=telemetry,
        collectives=collectives,
    )


def _errors() -> dict:
    """Messages of the layouts the optimizer refuses (ValueError expected)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from vradam.group import GroupTensors

    one_d, two_d = init_device_mesh("cpu", (2,)), init_device_mesh("cpu", (1, 2))
    out = {}

    def message(fn):
        try:
            fn()
        except ValueError as err:
            return str(err)
        return None

    def step_on(params):
        for p in params:
            p.grad = torch.ones_like(p)
        return VRAdam(params).step()

    out["meshes"] = message(lambda: step_on([
        torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), one_d, [Shard(0)])),
        torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), two_d, [Shard(0), Shard(1)])),
    ]))
    out["partial"] = message(lambda: step_on([
        torch.nn.Parameter(DTensor.from_local(torch.ones(2), one_d, [Partial()]))]))
    sharded = distribute_tensor(torch.ones(4), one_d, [Shard(0)])
    out["gradient"] = message(lambda: local_shards([GroupTensors(
        [sharded], [torch.ones(2)], [torch.zeros_like(sharded)], [torch.zeros_like(sharded)],
        [torch.tensor(0.0)], lr=0.1, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=1.0, eps=1e-8,
        weight_decay=0.0)]))
    if HAS_TRITON:
        from vradam import fused_triton

        out["fused-direct"] = message(lambda: fused_triton.fused_step([GroupTensors(
            [sharded], [sharded.clone()], [torch.zeros_like(sharded)], [torch.zeros_like(sharded)],
            [torch.tensor(0.0)], lr=0.1, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=1.0, eps=1e-8,
            weight_decay=0.0)], gate="velocity", power=2.0, norm_scope="global"))
    return out


def _rank_main(
    rank: int, store_path: str, out_dir: str, scenarios: list[dict], with_errors: bool
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    try:
        results = {}
        for scenario in scenarios:
            if scenario["impl"] == "fused" and os.environ.get("TRITON_INTERPRET") != "1":
                results[scenario["name"]] = None  # a forkserver started without it: no interpreter
            elif scenario["kind"] == "fsdp":
                results[scenario["name"]] = _run_fsdp(scenario, rank)
            else:
                results[scenario["name"]] = _run_manual(scenario)
        if with_errors:
            results["errors"] = _errors()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------- tests


def _start_method() -> str:
    """forkserver, preloaded: one process imports torch and its compiler stack (seconds)
    and the ranks fork from it, instead of each rank importing them on busy cores.
    Nothing has run a thread pool in that server, so forking it is safe."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch._dynamo", "torch.distributed.fsdp", "torch.distributed.tensor", __name__]
    )
    return "forkserver"


@pytest.fixture(scope="module")
def alpha1s():
    return _alpha1s()


def _launch(tmp_path_factory, scenarios: list[dict], with_errors: bool = False) -> dict:
    """Run the scenarios on two ranks: name -> (scenario, per-rank results, single process)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    with pytest.MonkeyPatch.context() as env:
        # Triton reads it at import, in the forkserver (torch._dynamo imports triton) or in
        # each spawned rank: the ranks run the fused kernels on CPU through the interpreter.
        env.setenv("TRITON_INTERPRET", "1")
        mp.start_processes(
            _rank_main, args=(str(out_dir / "store"), str(out_dir), scenarios, with_errors),
            nprocs=WORLD, start_method=_start_method(),
        )
    per_rank = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    out = {}
    for s in scenarios:
        single = (_single_process_fsdp if s["kind"] == "fsdp" else _single_process_manual)(s)
        out[s["name"]] = (s, [r[s["name"]] for r in per_rank], single)
    if with_errors:
        out["errors"] = [r["errors"] for r in per_rank]
    return out


# One launch per fixture (the first also starts the forkserver): each stays within seconds.
@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, alpha1s):
    return _launch(tmp_path_factory, _fsdp_scenarios(alpha1s))


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, alpha1s):
    return _launch(tmp_path_factory, _layout_scenarios(alpha1s), with_errors=True)


@pytest.fixture(scope="module")
def fused_runs(tmp_path_factory, alpha1s):
    return _launch(tmp_path_factory, _fused_scenarios(alpha1s))


def _assert_matches(ranks: list[dict], single: dict, rtol=RTOL, atol=ATOL) -> None:
    for rank, got in enumerate(ranks):
        for key in ("params", "exp_avg", "exp_avg_sq"):
            for i, (a, b) in enumerate(zip(got[key], single[key])):
                where = f"rank {rank}, {key}[{i}]"
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                           msg=lambda m, where=where: f"{where}: {m}")
        assert len(got["telemetry"]) == len(single["telemetry"])
        for step, (mine, theirs) in enumerate(zip(got["telemetry"], single["telemetry"])):
            for g in range(2):
                for key in ("eta", "sq_norm"):
                    where = f"rank {rank}, step {step + 1}, group {g}, {key}"
                    torch.testing.assert_close(mine[g][key], theirs[g][key], rtol=rtol, atol=0,
                                               msg=lambda m, where=where: f"{where}: {m}")
                assert bool(mine[g]["clamped"]) == bool(theirs[g]["clamped"]), (rank, step, g)


@needs_distributed
@pytest.mark.parametrize("impl, gate, scope", FSDP_CASES)
def test_fsdp2_matches_single_process(fsdp_runs, impl, gate, scope):
    _, ranks, single = fsdp_runs[f"fsdp-{impl}-{gate}-{scope}"]
    _assert_matches(ranks, single)
    clamps = {bool(step[0]["clamped"]) for step in single["telemetry"]}
    assert clamps == {True, False}, "the run must cover clamped and unclamped steps"
    for got in ranks:
        assert got["collectives"] == [1] * STEPS  # one all-reduce per step, both scopes
        assert all(got["state_placements"])  # moments stay DTensors laid out like their params


@needs_distributed
def test_scopes_really_differ_in_the_sharded_runs(fsdp_runs):
    """Group scope gates group 1 on its own norm: a check that the scope reaches the ranks."""
    _, (g_rank0, _), _ = fsdp_runs["fsdp-foreach-velocity-group"]
    _, (a_rank0, _), _ = fsdp_runs["fsdp-foreach-velocity-global"]
    first = [g_rank0["telemetry"][0][k]["sq_norm"] for k in range(2)]
    torch.testing.assert_close(a_rank0["telemetry"][0][0]["sq_norm"], first[0] + first[1],
                               rtol=1e-12, atol=0)
    assert first[0] > 0 and first[1] > 0


@needs_distributed
@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_hsdp_sums_over_the_shard_dimension_only(fsdp_runs, mesh):
    """(Replicate, Shard) on 2x1: each rank holds everything, nothing to add (summing
    over the replicas would double s_t); on 1x2: the two shards are added."""
    _, ranks, single = fsdp_runs[f"hsdp-{mesh}"]
    _assert_matches(ranks, single)
    for got in ranks:
        assert got["collectives"] == [1] * STEPS


@needs_distributed
def test_beta3_zero_under_fsdp2_is_torch_adamw(fsdp_runs):
    _, ranks, _ = fsdp_runs["fsdp-adamw-twin"]
    _, adamw_ranks, adamw_single = fsdp_runs["fsdp-adamw"]
    for got in ranks:
        for key in ("params", "exp_avg", "exp_avg_sq"):
            for a, b, c in zip(got[key], adamw_single[key], adamw_ranks[0][key]):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)  # AdamW in one process
                torch.testing.assert_close(a, c, rtol=RTOL, atol=ATOL)  # AdamW under FSDP2
        for step in got["telemetry"]:
            assert step[0]["eta"].item() == GROUP_0["lr"] and step[1]["eta"].item() == GROUP_1["lr"]


@needs_distributed
def test_without_the_all_reduce_the_result_differs(fsdp_runs):
    """all_reduce_sums replaced by the identity: each rank gates on its own shards' norm."""
    _, ranks, single = fsdp_runs["fsdp-dropped-reduce"]
    with pytest.raises(AssertionError):
        _assert_matches(ranks, single)
    truth = single["telemetry"][0][0]["sq_norm"]
    local = [got["telemetry"][0][0]["sq_norm"] for got in ranks]
    assert all(0 < s < truth for s in local)  # each rank saw only part of s_1 ...
    torch.testing.assert_close(local[0] + local[1], truth, rtol=1e-12, atol=0)  # ... and the parts add up
    assert abs(ranks[0]["params"][0] - single["params"][0]).max() > 1e-6


@needs_distributed
@pytest.mark.parametrize("impl", ["single_tensor", "foreach"])
@pytest.mark.parametrize("layout", list(MANUAL_LAYOUTS))
def test_mixed_layouts_count_every_entry_once(layout_runs, layout, impl):
    """Shard(0), Shard(1), Replicate DTensors and a plain tensor in one optimizer,
    on a 1-D mesh, a (1, 2) 'FSDP + TP' mesh and a (1, 1, 2) mesh."""
    _, ranks, single = layout_runs[f"manual-{layout}-{impl}"]
    _assert_matches(ranks, single)
    for got in ranks:
        assert got["collectives"] == [EXPECTED_COLLECTIVES[layout]] * STEPS


@needs_distributed
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional extra 'fused')")
@pytest.mark.parametrize("name", ["fsdp-fused", "manual-1d-fused"])
def test_fused_step_on_local_shards(fused_runs, name):
    """impl='fused' (Triton interpreter on CPU, float32) on FSDP2 shards and on the
    mixed 1-D layout, against foreach in one process in float32.

    float32 tolerance (observed: 3e-6 relative on a moment): the kernels round
    and accumulate in another order than foreach.
    """
    scenario, ranks, single = fused_runs[name]
    if ranks[0] is None:
        pytest.skip("the ranks' forkserver was started without TRITON_INTERPRET=1")
    _assert_matches(ranks, single, rtol=2e-5, atol=1e-6)
    for got in ranks:
        assert got["collectives"] == [1] * scenario["steps"]


@needs_distributed
def test_bad_layouts_are_refused_with_value_errors(layout_runs):
    for errors in layout_runs["errors"]:
        assert "one DeviceMesh" in errors["meshes"]
        assert "Partial" in errors["partial"] and "allowed" in errors["partial"]
        assert "gradient" in errors["gradient"] and "placements" in errors["gradient"]
        if HAS_TRITON:
            assert "DTensor" in errors["fused-direct"] and "foreach" in errors["fused-direct"]


def test_plain_tensors_need_no_collective(monkeypatch):
    """DDP and single-process runs: plain tensors never reach the reduction."""
    def refuse(*args, **kwargs):
        raise AssertionError("all_reduce_sums called for plain tensors")

    monkeypatch.setattr(vradam.distributed, "all_reduce_sums", refuse)
    params = [torch.nn.Parameter(p) for p in _manual_params()]
    for foreach in (False, True):
        opt = VRAdam(params, foreach=foreach)
        smooth_loss(params).backward()
        opt.step()


@needs_distributed
def test_sharded_step_reads_nothing_back_on_meta_tensors():
    """The strict no-sync check of test_no_sync.py, for the sharded path: local shards on
    the meta device hold no values, so any host read of one raises, and a fake process
    group (rank 0 of 2, in this process) takes the all-reduce without communicating."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    torch.distributed.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))

        def meta_dtensor(placement, shape):
            local = torch.empty(shape[0] // 2 if placement.is_shard() else shape[0], *shape[1:],
                                device="meta")
            return DTensor.from_local(local, mesh, [placement], shape=torch.Size(shape),
                                      stride=torch.empty(shape).stride())

        for foreach in (False, True):
            for capturable in (False, True):
                params = [torch.nn.Parameter(meta_dtensor(Shard(0), (6, 4))),
                          torch.nn.Parameter(meta_dtensor(Replicate(), (3,))),
                          torch.nn.Parameter(torch.empty(5, device="meta"))]
                for p in params:
                    p.grad = torch.empty_like(p)
                opt = VRAdam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}],
                             foreach=foreach, capturable=capturable, norm_scope="group")
                for _ in range(2):
                    with CommDebugMode() as comm:
                        opt.step()
                    assert comm.get_total_counts() == 1
                assert opt.telemetry(1)["eta"].device.type == "meta"
                assert opt.state[params[0]]["exp_avg"].to_local().device.type == "meta"
    finally:
        torch.distributed.destroy_process_group()
