"""The fused Triton step against the reference, on CPU through Triton's interpreter.

Triton decides at import whether kernels are interpreted (``TRITON_INTERPRET``),
so the fused side runs in a child process (this file run as a script) with the
variable set; the pytest process never imports Triton in interpreter mode.
The parent builds every scenario (parameters, gradients per step, options),
the child steps it with ``impl="fused"`` and saves the state after each step,
and the parent checks it against independent answers:

* each step, from the child's state before it, against ``reference_step`` in
  float64, rounded to the storage dtype (float32: float32 tolerance; bf16 /
  fp16: one unit in the last place, plus the effect of 16-bit moments);
* float32 trajectories against ``reference_step`` run in float32 from the start;
* beta3 = 0 against ``torch.optim.AdamW``;
* the lagged variant against the lagged rule written out in this file.

Kernels are also compiled for an sm_90 GPU (no GPU needed); the CUDA-only
checks (sync debug mode, graph capture and replay) are marked ``gpu``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vradam.group import GroupTensors, Telemetry
from vradam.reference import reference_step

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_PYTHONPATH = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (optional extra 'fused')"
)

# Small launch shape so that tensors span several chunks and tiles.
SMALL_CONFIG = (64, 16, 1)  # chunk, block, num_warps

HYPER_A = dict(lr=0.05, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=10.0, eps=1e-8,
               weight_decay=0.1, maximize=False)
HYPER_B = dict(lr=0.02, beta1=0.8, beta2=0.99, beta3=3.0, alpha1=2.0, eps=1e-6,
               weight_decay=0.0, maximize=True)


# -------------------------------------------------------------- scenarios


def _dense_params(gen: torch.Generator, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Two groups: multi-chunk, transposed (dense, non-contiguous), zero-size, tiny,
    and a view starting 4 bytes into its storage (not 16-byte aligned)."""
    transposed = torch.randn(9, 12, generator=gen).t()
    group_a = [torch.randn(150, generator=gen), transposed, torch.zeros(0)]
    group_b = [torch.randn(3, 5, generator=gen), torch.randn(1, generator=gen),
               torch.randn(41, generator=gen)[1:]]
    return [[p.to(dtype) for p in group_a], [p.to(dtype) for p in group_b]]


def _grads(gen, params, scale: float, missing: set[tuple[int, int]]):
    """One step's gradients (same layout as their parameters); None where missing."""
    out = []
    for gi, group in enumerate(params):
        row = []
        for pi, p in enumerate(group):
            if (gi, pi) in missing:
                row.append(None)
                continue
            g = torch.empty_like(p)
            g.copy_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
            row.append(g)
        out.append(row)
    return out


def make_scenario(
    name: str, *, gate="velocity", power=2.0, norm_scope="global", dtype=torch.float32,
    moment_dtype=torch.float32, hypers=(HYPER_A, HYPER_B), steps=3, grad_scale=1.0,
    missing_at=None, step_counts="device", lr_tensor=False, variant="exact", seed=0,
) -> dict:
    """Everything the child needs to run one case, as tensors and plain values."""
    gen = torch.Generator().manual_seed(seed)
    params = _dense_params(gen, dtype)
    missing_at = missing_at or {}
    grads = [
        _grads(gen, params, grad_scale * (1 + t), missing_at.get(t, set())) for t in range(steps)
    ]
    return dict(
        name=name, options=dict(gate=gate, power=power, norm_scope=norm_scope),
        hypers=[dict(h) for h in hypers], params=params, grads=grads,
        moment_dtype=moment_dtype, step_counts=step_counts, lr_tensor=lr_tensor,
        variant=variant,
    )


def scenarios() -> list[dict]:
    return [
        make_scenario("velocity_global"),
        make_scenario("gradient_global", gate="gradient"),
        make_scenario("velocity_group", norm_scope="group"),
        make_scenario("gradient_group_power3", gate="gradient", norm_scope="group", power=3.0),
        make_scenario("velocity_power1.5", power=1.5),
        # group B has no gradient at all at step 1 (group scope: eta = lr, s = 0)
        make_scenario("missing_grads", norm_scope="group",
                      missing_at={1: {(0, 1), (1, 0), (1, 1), (1, 2)}, 2: {(0, 0)}}),
        # large gradients: the clamp bites from the first step on
        make_scenario("clamped", grad_scale=30.0),
        make_scenario("beta1_zero", hypers=(dict(HYPER_A, beta1=0.0), HYPER_B)),
        make_scenario("bf16_params_f32_moments", dtype=torch.bfloat16),
        make_scenario("bf16_params_bf16_moments", dtype=torch.bfloat16,
                      moment_dtype=torch.bfloat16, gate="gradient"),
        make_scenario("fp16_params", dtype=torch.float16, norm_scope="group"),
        make_scenario("host_step_counts", step_counts="mirror"),
        make_scenario("tensor_lr", lr_tensor=True),
        make_scenario("adamw", hypers=(dict(HYPER_A, beta3=0.0), dict(HYPER_B, beta3=0.0)),
                      missing_at={2: {(0, 1)}}),
        make_scenario("lagged_velocity", variant="lagged", grad_scale=3.0),
        make_scenario("lagged_gradient_group", variant="lagged", gate="gradient",
                      norm_scope="group", power=1.5),
    ]


# ------------------------------------------------ stepping a scenario


def initial_state(scn: dict) -> dict:
    """Fresh parameters (copies, layout kept), zero moments and step counts."""
    def zero_moment(p):
        return torch.zeros_like(p, dtype=scn["moment_dtype"])

    return dict(
        params=[[same_layout_copy(p) for p in g] for g in scn["params"]],
        exp_avgs=[[zero_moment(p) for p in g] for g in scn["params"]],
        exp_avg_sqs=[[zero_moment(p) for p in g] for g in scn["params"]],
        steps=[[torch.zeros((), dtype=torch.float32) for _ in g] for g in scn["params"]],
    )


def same_layout_copy(p: torch.Tensor) -> torch.Tensor:
    """A copy with p's shape, strides and storage offset (so alignment is kept too)."""
    base = torch.empty(p.storage_offset() + p.numel(), dtype=p.dtype)
    return base.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(p)


def copy_state(state: dict, dtype: torch.dtype | None = None) -> dict:
    """A deep copy (layout kept); tensors other than step counts cast to ``dtype``."""
    def copy(t, key):
        target = dtype if dtype is not None and key != "steps" else t.dtype
        return torch.empty_like(t, dtype=target).copy_(t)

    return {k: [[copy(t, k) for t in g] for g in v] for k, v in state.items()}


def group_tensors(scn: dict, state: dict, grads: list, dtype=None) -> list[GroupTensors]:
    """The functional core's input: per group, the parameters that have a gradient."""
    groups = []
    for gi, hyper in enumerate(scn["hypers"]):
        keep = [i for i, g in enumerate(grads[gi]) if g is not None]
        lr = torch.tensor(hyper["lr"]) if scn["lr_tensor"] else hyper["lr"]
        groups.append(GroupTensors(
            params=[state["params"][gi][i] for i in keep],
            grads=[grads[gi][i].to(dtype) if dtype else grads[gi][i] for i in keep],
            exp_avgs=[state["exp_avgs"][gi][i] for i in keep],
            exp_avg_sqs=[state["exp_avg_sqs"][gi][i] for i in keep],
            steps=[state["steps"][gi][i] for i in keep],
            **{**hyper, "lr": lr},
        ))
    return groups


def telemetry_values(tels: list[Telemetry]) -> list[tuple[float, float, bool]]:
    return [(float(t.eta), float(t.sq_norm), bool(t.clamped)) for t in tels]


# ------------------------------------------- the child: fused steps


def run_fused(scn: dict) -> list[dict]:
    """Step a scenario with the fused kernels; the state and telemetry after each step."""
    from vradam import fused_triton  # noqa: PLC0415  (the child imports Triton here)

    config = fused_triton.FusedConfig(*SMALL_CONFIG)
    steps_in_place = fused_triton._steps_in_place
    if scn["step_counts"] == "mirror":  # as when counts live on the host and params on CUDA
        fused_triton._steps_in_place = lambda groups, device: False
    state = initial_state(scn)
    previous = [torch.zeros(()) for _ in scn["hypers"]]
    trajectory = []
    try:
        for grads in scn["grads"]:
            groups = group_tensors(scn, state, grads)
            if scn["variant"] == "lagged":
                tels = fused_triton.fused_lagged_step(
                    groups, **scn["options"], previous_sq_norms=previous, config=config)
                previous = [t.sq_norm for t in tels]
            else:
                tels = fused_triton.fused_step(groups, **scn["options"], config=config)
            trajectory.append(dict(state=copy_state(state), telemetry=telemetry_values(tels)))
    finally:
        fused_triton._steps_in_place = steps_in_place
    return trajectory


def child_main(inputs: str, outputs: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vradam import fused_triton  # noqa: PLC0415

    assert fused_triton.is_interpreted()
    results = {scn["name"]: run_fused(scn) for scn in torch.load(inputs, weights_only=True)}
    results["refusals"] = refusals()
    torch.save(results, outputs)


def refusals() -> dict[str, str]:
    """The fused step's error for inputs it cannot take ("" where it took them)."""
    from vradam import fused_triton  # noqa: PLC0415

    def attempt(param: torch.Tensor, grad: torch.Tensor) -> str:
        group = GroupTensors([param], [grad], [torch.zeros_like(param)],
                             [torch.zeros_like(param)], [torch.zeros(())], **HYPER_A)
        try:
            fused_triton.fused_step([group], gate="velocity", power=2.0, norm_scope="global")
        except ValueError as err:
            return str(err)
        return ""

    strided = torch.zeros(6, 4)[:, ::2]
    return {
        "float64": attempt(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)),
        "strided_slice": attempt(strided, torch.ones_like(strided)),
        "grad_layout": attempt(torch.zeros(4, 3), torch.ones(3, 4).t()),
    }


@pytest.fixture(scope="module")
def fused_results(tmp_path_factory) -> dict:
    """Run every scenario through the interpreted kernels, once, in a child process."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (optional extra 'fused')")
    folder = tmp_path_factory.mktemp("fused")
    inputs, outputs = folder / "scenarios.pt", folder / "fused.pt"
    torch.save(SCENARIOS, inputs)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=CHILD_PYTHONPATH)
    proc = subprocess.run(
        [sys.executable, __file__, str(inputs), str(outputs)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(outputs, weights_only=True)


# -------------------------------------------------- independent answers


def lagged_reference_step(groups, *, gate, power, norm_scope, previous):
    """The lagged rule written out: eta_t from s_{t-1}; returns (eta, s_t, clamped) per group."""
    sources = []
    for g in groups:
        group_sources = []
        for grad, v, m, step in zip(g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps):
            grad = -grad if g.maximize else grad
            step.add_(1)
            v.copy_(g.beta1 * v + (1 - g.beta1) * grad)
            m.copy_(g.beta2 * m + (1 - g.beta2) * grad * grad)
            group_sources.append(v if gate == "velocity" else grad)
        sources.append(group_sources)
    sums = [sum(float((x.abs() ** power).sum()) for x in xs) for xs in sources]
    if norm_scope == "global":
        sums = [sum(sums)] * len(sums)
    out = []
    for g, s_prev, s_now in zip(groups, previous, sums):
        eta = g.lr / (1 + min(g.beta3 * s_prev, g.alpha1))
        for p, v, m, step in zip(g.params, g.exp_avgs, g.exp_avg_sqs, g.steps):
            t = float(step)
            v_hat, m_hat = v / (1 - g.beta1**t), m / (1 - g.beta2**t)
            p.copy_(p * (1 - eta * g.weight_decay) - eta * v_hat / (m_hat.sqrt() + g.eps))
        out.append((eta, s_now, g.beta3 * s_prev >= g.alpha1))
    return out


def reference_one_step(scn: dict, state: dict, grads: list, previous) -> tuple[dict, list]:
    """From ``state`` (copied to float64), one step of the reference; (state, telemetry)."""
    state = copy_state(state, torch.float64)
    groups = group_tensors(scn, state, grads, dtype=torch.float64)
    if scn["variant"] == "lagged":
        tels = lagged_reference_step(groups, **scn["options"], previous=previous)
    else:
        tels = telemetry_values(reference_step(groups, **scn["options"]))
    return state, tels


TOLERANCE = {  # (rtol, atol): float32 tolerance; one unit in the last place for 16 bits
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2.0**-7, 1e-6),
    torch.float16: (2.0**-10, 1e-6),
}


def assert_state_close(actual: dict, expected: dict, where: str, before: dict | None = None):
    """Every tensor within its dtype's tolerance.

    With 16-bit moments the fused update reads the moments as stored (rounded,
    relative error <= 2^-9 each) while the float64 reference does not, so the
    parameters also get 2^-7 of the update (``expected - before``) as slack.
    """
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for gi, (xs, ys) in enumerate(zip(actual[key], expected[key])):
            for pi, (x, y) in enumerate(zip(xs, ys)):
                rtol, atol = TOLERANCE[x.dtype]
                x, y = x.double(), y.to(x.dtype).double()
                bound = atol + rtol * y.abs()
                rounded_moments = actual["exp_avgs"][gi][pi].dtype != torch.float32
                if key == "params" and before is not None and rounded_moments:
                    bound = bound + 2.0**-7 * (y - before[key][gi][pi].double()).abs()
                excess = (x - y).abs() - bound
                assert not (excess > 0).any(), (
                    f"{where}: {key}[{gi}][{pi}]: worst excess {float(excess.max()):.3g} "
                    f"over the tolerance; actual {x}, expected {y}"
                )


def assert_telemetry_close(actual, expected, where: str) -> None:
    for gi, ((eta, s, clamped), (eta_ref, s_ref, clamped_ref)) in enumerate(zip(actual, expected)):
        assert clamped == bool(clamped_ref), f"{where}: group {gi} clamp flag"
        assert eta == pytest.approx(float(eta_ref), rel=1e-5), f"{where}: group {gi} eta"
        assert s == pytest.approx(float(s_ref), rel=1e-5, abs=1e-7), f"{where}: group {gi} s"


SCENARIOS = scenarios()


@needs_triton
@pytest.mark.parametrize("scn", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_each_fused_step_equals_reference(fused_results, scn):
    """Step by step, from the fused state, the float64 reference rounded to storage dtype."""
    trajectory = fused_results[scn["name"]]
    assert len(trajectory) == len(scn["grads"])
    state, previous = initial_state(scn), [0.0] * len(scn["hypers"])
    for t, (grads, after) in enumerate(zip(scn["grads"], trajectory)):
        expected, tels = reference_one_step(scn, state, grads, previous)
        assert_state_close(after["state"], expected, f"step {t + 1}", before=state)
        assert_telemetry_close(after["telemetry"], tels, f"step {t + 1}")
        state, previous = after["state"], [s for _, s, _ in after["telemetry"]]


FLOAT32_EXACT = [s for s in SCENARIOS if s["params"][0][0].dtype == torch.float32
                 and s["variant"] == "exact"]


@needs_triton
@pytest.mark.parametrize("scn", FLOAT32_EXACT, ids=[s["name"] for s in FLOAT32_EXACT])
def test_fused_trajectory_equals_float32_reference(fused_results, scn):
    state = initial_state(scn)
    for t, (grads, after) in enumerate(zip(scn["grads"], fused_results[scn["name"]])):
        tels = telemetry_values(reference_step(group_tensors(scn, state, grads), **scn["options"]))
        assert_telemetry_close(after["telemetry"], tels, f"step {t + 1}")
    assert_state_close(fused_results[scn["name"]][-1]["state"], state, "final")


@needs_triton
def test_beta3_zero_is_torch_adamw(fused_results):
    """Independent of this package: beta3 = 0 steps like torch.optim.AdamW."""
    scn = next(s for s in SCENARIOS if s["name"] == "adamw")
    state = initial_state(scn)
    params = [p for g in state["params"] for p in g]
    adamw = torch.optim.AdamW(
        [dict(params=state["params"][gi], lr=h["lr"], betas=(h["beta1"], h["beta2"]),
              eps=h["eps"], weight_decay=h["weight_decay"], maximize=h["maximize"])
         for gi, h in enumerate(scn["hypers"])],
        foreach=False,
    )
    for grads in scn["grads"]:
        for p, g in zip(params, [g for row in grads for g in row]):
            p.grad = g
        adamw.step()
    fused = [p for g in fused_results["adamw"][-1]["state"]["params"] for p in g]
    for p, q in zip(fused, params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@needs_triton
def test_scenarios_see_the_clamp_bite_and_not_bite(fused_results):
    """The clamp flag is checked both ways, within one run too (velocity_global)."""
    flags = [c for scn in SCENARIOS for step in fused_results[scn["name"]]
             for _, _, c in step["telemetry"]]
    assert any(flags) and not all(flags)
    first_group = [step["telemetry"][0][2] for step in fused_results["velocity_global"]]
    assert any(first_group) and not all(first_group)


@needs_triton
def test_lagged_variant_differs_from_exact_rule(fused_results):
    """The lag is visible: the first lagged step always runs at lr, the exact one does not."""
    eta_lagged = fused_results["lagged_velocity"][0]["telemetry"][0][0]
    eta_exact = fused_results["velocity_global"][0]["telemetry"][0][0]
    assert eta_lagged == pytest.approx(HYPER_A["lr"])
    assert eta_exact < HYPER_A["lr"]


@needs_triton
def test_fused_refuses_what_its_kernels_cannot_walk(fused_results):
    errors = fused_results["refusals"]
    assert "float64" in errors["float64"] and "allowed: float32" in errors["float64"]
    assert "dense layout" in errors["strided_slice"]
    assert "dense layout" in errors["grad_layout"]


def test_fused_refuses_cpu_tensors_without_the_interpreter():
    """Outside the interpreter the fused step names the device it needs."""
    if HAS_TRITON:
        from vradam import fused_triton  # noqa: PLC0415
        if fused_triton.is_interpreted():
            pytest.skip("this process runs Triton's interpreter")
    from vradam.functional import vradam_step  # noqa: PLC0415

    scn = make_scenario("cpu", steps=1)
    groups = group_tensors(scn, initial_state(scn), scn["grads"][0])
    with pytest.raises((ValueError, RuntimeError), match="cuda|Triton"):
        vradam_step(groups, gate="velocity", power=2.0, norm_scope="global", impl="fused")


WITHOUT_TRITON = r"""
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError("no triton here")
sys.meta_path.insert(0, NoTriton())
import torch
from vradam import fused_triton
from vradam.functional import vradam_step
from vradam.group import GroupTensors
assert not fused_triton.is_available()
group = GroupTensors([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)],
                     [torch.zeros(())], lr=0.1, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=10.0,
                     eps=1e-8, weight_decay=0.0)
try:
    vradam_step([group], gate="velocity", power=2.0, norm_scope="global", impl="fused")
except RuntimeError as err:
    print(err)
"""


def test_module_imports_without_triton_and_the_step_says_what_is_missing():
    env = dict(os.environ, PYTHONPATH=CHILD_PYTHONPATH)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs Triton" in proc.stdout and "eos-toolkit[fused]" in proc.stdout


# ------------------------------------------------- compiled for a GPU


COMPILE_CHECK = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vradam import _triton_kernels as K
target = GPUTarget("cuda", 90, 32)
common = dict(chunk_table="*i64", partial_norms="*fp32", first_partial="i32")
def build(fn, signature, constexprs):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
moments = dict(beta1="fp32", one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32")
for dtype, power_is_two in ((tl.bfloat16, False), (tl.float32, True)):
    build(K.first_pass_kernel, dict(common, **moments, power="fp32"),
          dict(GRAD_DTYPE=dtype, MOMENT_DTYPE=tl.float32, MAXIMIZE=True, GATE_IS_VELOCITY=True,
               POWER_IS_TWO=power_is_two, INCREMENT_STEPS=True, ALIGNED=True, CHUNK=8192,
               BLOCK=1024))
build(K.reduce_norm_kernel, dict(partial_norms="*fp32", group_bounds="*i64", sq_norms="*fp32",
      num_groups="i32"), dict(BLOCK=1024))
rate = dict(eta_out="*fp32", clamped_out="*i1", telemetry_slot="i32", lr="*fp32")
update = dict(log_beta1="fp32", log_beta2="fp32", eps="fp32", weight_decay="fp32")
build(K.second_pass_kernel, dict(chunk_table="*i64", sq_norms="*fp32", norm_slot="i32", **rate,
      beta3="fp32", alpha1="fp32", **update),
      dict(PARAM_DTYPE=tl.float16, MOMENT_DTYPE=tl.float32, LR_IS_POINTER=True, ALIGNED=True,
           CHUNK=8192, BLOCK=1024))
build(K.one_pass_kernel, dict(chunk_table="*i64", previous_sq_norm="*fp32", partial_norms="*fp32",
      first_partial="i32", **rate, **moments, beta3="fp32", alpha1="fp32", **update, power="fp32"),
      dict(PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16, MOMENT_DTYPE=tl.bfloat16,
           MAXIMIZE=False, GATE_IS_VELOCITY=False, POWER_IS_TWO=False, LR_IS_POINTER=True,
           ALIGNED=False, CHUNK=65536, BLOCK=1024))
print("compiled")
"""


@needs_triton
def test_kernels_compile_for_an_sm90_gpu():
    """The real compiler (not the interpreter) accepts every kernel, down to a cubin."""
    backend = importlib.util.find_spec("triton.backends.nvidia")
    if backend is None or not list(Path(backend.origin).parent.glob("bin/ptxas*")):
        pytest.skip("this triton build has no NVIDIA backend with ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=CHILD_PYTHONPATH, TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------ on CUDA


def _cuda_groups(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(257, 129), (129,), (64, 3, 3, 3), (0,), (1000,)]
    params = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    groups = []
    for hyper, idx in ((HYPER_A, [0, 1, 2]), (HYPER_B, [3, 4])):
        groups.append(GroupTensors(
            params=[params[i] for i in idx], grads=[grads[i] for i in idx],
            exp_avgs=[torch.zeros_like(params[i], dtype=torch.float32) for i in idx],
            exp_avg_sqs=[torch.zeros_like(params[i], dtype=torch.float32) for i in idx],
            steps=[torch.zeros((), device="cuda") for _ in idx], **hyper,
        ))
    return groups


def _clone_groups(groups):
    def c(ts):
        return [t.clone() for t in ts]

    return [GroupTensors(c(g.params), c(g.grads), c(g.exp_avgs), c(g.exp_avg_sqs), c(g.steps),
                         g.lr, g.beta1, g.beta2, g.beta3, g.alpha1, g.eps, g.weight_decay,
                         g.maximize) for g in groups]


def _assert_groups_close(actual, expected):
    for a, e in zip(actual, expected):
        for xs, ys in ((a.params, e.params), (a.exp_avgs, e.exp_avgs),
                       (a.exp_avg_sqs, e.exp_avg_sqs), (a.steps, e.steps)):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_scope", ["global", "group"])
@pytest.mark.parametrize("gate", ["velocity", "gradient"])
def test_fused_on_cuda_equals_reference_without_sync(gate, norm_scope):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vradam import fused_triton  # noqa: PLC0415

    if not fused_triton.is_available():
        pytest.skip("triton is not installed")
    fused, ref = _cuda_groups(0), None
    ref = _clone_groups(fused)
    options = dict(gate=gate, power=2.0, norm_scope=norm_scope)
    fused_triton.fused_step(fused, **options)  # first step builds the chunk tables
    reference_step(ref, **options)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tels = fused_triton.fused_step(fused, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        ref_tels = reference_step(ref, **options)
    _assert_groups_close(fused, ref)
    for t, r in zip(tels, ref_tels):
        torch.testing.assert_close(t.eta, r.eta.float(), rtol=1e-5, atol=0)
        assert bool(t.clamped) == bool(r.clamped)


@pytest.mark.gpu
def test_fused_step_captures_and_replays_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vradam import fused_triton  # noqa: PLC0415

    if not fused_triton.is_available():
        pytest.skip("triton is not installed")
    fused = _cuda_groups(1)
    ref = _clone_groups(fused)
    options = dict(gate="velocity", power=2.0, norm_scope="global")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, builds the chunk tables
        fused_triton.fused_step(fused, **options)
    torch.cuda.current_stream().wait_stream(side)
    reference_step(ref, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tels = fused_triton.fused_step(fused, **options)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        new_grads = [[torch.randn(g.shape, generator=gen).cuda() for g in grp.grads]
                     for grp in fused]
        for grp, ref_grp, grads in zip(fused, ref, new_grads):
            for g, rg, new in zip(grp.grads, ref_grp.grads, grads):
                g.copy_(new)
                rg.copy_(new)
        graph.replay()
        ref_tels = reference_step(ref, **options)
        torch.cuda.synchronize()
        _assert_groups_close(fused, ref)
        torch.testing.assert_close(tels[0].eta, ref_tels[0].eta.float(), rtol=1e-5, atol=0)


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])


CLASS_CHILD = """
import torch
from vradam import VRAdam
torch.manual_seed(0)
base = [torch.randn(7, 5), torch.randn(300), torch.randn(3)]
fused_params = [p.clone().requires_grad_() for p in base]
plain_params = [p.clone().requires_grad_() for p in base]
fused = VRAdam(fused_params, lr=0.05, beta3=2.0, alpha1=1.0, fused=True)
plain = VRAdam(plain_params, lr=0.05, beta3=2.0, alpha1=1.0, foreach=True)
for step in range(3):
    grads = [torch.randn_like(p) for p in base]
    for opt, params in ((fused, fused_params), (plain, plain_params)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fused_params, plain_params))
eta_err = abs(fused.telemetry()["eta"].item() - plain.telemetry()["eta"].item())
print(err, eta_err, fused.telemetry()["clamped"].item())
"""


@needs_triton
def test_the_class_steps_with_fused_true_like_foreach():
    """VRAdam(fused=True) through the interpreter equals VRAdam(foreach=True)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": CHILD_PYTHONPATH}
    out = subprocess.run([sys.executable, "-c", CLASS_CHILD], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    err, eta_err, clamped = out.stdout.split()
    assert float(err) < 1e-6 and float(eta_err) < 1e-9
    assert clamped == "True"  # the scenario exercises the clamp
