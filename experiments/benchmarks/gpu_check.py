"""Check the toolkit on one CUDA GPU in one run: its tests, the fused step's numbers, syncs, graphs and speed.

Seven items (``--items`` picks some), each printing one line
``item N <name>: PASS|FAIL|SKIP <facts> (<seconds> s)`` and indented details:

1. **gpu tests**: ``python -m pytest -m gpu -q`` in a subprocess; the counts
   of its summary line (every test skipped is SKIP, a failure FAIL).
2. **fused vs reference**: the fused (Triton) step against the float64
   reference for 50 steps, per storage layout (float32, bfloat16 and float16
   parameters with float32 moments; bfloat16 parameters with bfloat16
   moments, the optimizer's own layout for bf16 models), both gates, both
   norm scopes, two param groups.  Each step starts the reference from the
   fused state before it and rounds its result to the storage dtype; the
   largest absolute differences of parameters and moments must lie within
   :data:`STEP_TOLERANCE` of the storage dtype, step counts must be equal,
   eta within :data:`ETA_RTOL` and the clamp flags equal.
3. **syncs**: host-device synchronisations counted under
   ``torch.cuda.set_sync_debug_mode("warn")``, each attributed to the line of
   this project that caused it (:func:`recorded_syncs`) and *deliberate* when
   that statement carries a ``# sync:`` comment.  The VRAdam step (foreach,
   foreach with on-device step counts, fused) must have none, and one more
   step runs under mode ``"error"``.  Lanczos is solved twice, with two
   product budgets and ``tol=0``: sites whose count grows with the products
   are the loop's (the deliberate convergence tests among them, every
   ``check_every`` products), the others run once per solve.  The loop must
   have no unmarked sync.  A call that does sync (``.item()``) is counted
   first, to show the counting works.
4. **graph replay**: one fused step captured in a CUDA graph and replayed 100
   times, with new gradients before each replay, against 100 eager fused
   steps: the same parameters, moments, step counts and telemetry.
5. **step timing**: the optimizer step for a GPT-2-small-shaped parameter set
   (124.4 M values, 148 tensors) and a ResNet-50-shaped one (25.6 M, 161),
   timed with CUDA events, medians over interleaved repeats in one run: torch
   AdamW fused and foreach, VRAdam foreach and fused, as ratios to both
   AdamWs, and the achieved bandwidth (the bytes the step must move, see
   :data:`experiments.benchmarks.fused_step.BYTES_PER_VALUE`, over its time)
   against a device-to-device copy timed in the same rounds.
6. **curvature**: on the MLP and the CNN of the edge-of-stability study and the
   default language model, each product rule's time as a ratio to one
   gradient; then products and seconds of the top Hessian eigenvalue to
   1e-3 (our Lanczos from a random start, and warm from its own vector one
   gradient-descent step later) against scipy's ``eigsh(tol=0)`` on the same
   operator.  Real data where it is on this machine (Fashion-MNIST, the
   corpus ``auto`` picks), otherwise random inputs of the same shapes, and the
   line says which: the costs do not depend on the values.
7. **tracked run**: the demo's gradient-descent run (``eos demo``'s ``gd``),
   trained and tracked on the device, and the share of its wall time spent in
   the record's timed tracking work (Hessian solves and spectral densities).
   SKIP when the demo's data is not on this machine (nothing is downloaded).

Data come from the data layer's search (``EOS_DATA_DIR``, the cache) or
``--data-dir``; where there are none, item 6 runs on random inputs and item 7
says SKIP.  Without CUDA, items 2-7 print SKIP with the reason and item 1
still runs (the gpu tests skip themselves).  ``--smoke`` runs every item at tiny sizes on
whatever device there is, to exercise this script's own logic: on the CPU
the fused kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``),
and sync counting and graph capture, which need CUDA, say SKIP; the numbers
mean nothing there.  ``--json PATH`` writes everything measured (rewritten
after each item).  The exit status is 1 when an item FAILs, else 0.

    python -m experiments.benchmarks.gpu_check
    python -m experiments.benchmarks.gpu_check --items 2-4 --json gpu_check.json
    eos bench gpu --items 5
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eos_toolkit.collectives import synchronize
from experiments.benchmarks.timing import interleaved_medians, timed
from vradam import fused_triton
from vradam.group import GroupTensors, Telemetry
from vradam.settings import GATES, NORM_SCOPES

ROOT = Path(__file__).resolve().parents[2]
REL_TARGET = 1e-3  # item 6: the accuracy of the top eigenvalue the costs are counted to


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What an item found: PASS, FAIL or SKIP, the facts of its summary line, detail lines, and its numbers."""

    status: str
    facts: str
    details: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def worst_status(statuses: Iterable[str]) -> str:
    """FAIL if any failed, else PASS if any passed, else SKIP.

    >>> worst_status(["PASS", "SKIP"]), worst_status(["PASS", "FAIL"]), worst_status(["SKIP"])
    ('PASS', 'FAIL', 'SKIP')
    """
    statuses = list(statuses)
    if "FAIL" in statuses:
        return "FAIL"
    return "PASS" if "PASS" in statuses else "SKIP"


def summary_line(number: int, name: str, outcome: Outcome, seconds: float) -> str:
    """``item N <name>: STATUS <facts> (<seconds> s)``.

    >>> summary_line(3, "syncs", Outcome("PASS", "none"), 1.25)
    'item 3 syncs: PASS none (1.2 s)'
    """
    return f"item {number} {name}: {outcome.status} {outcome.facts} ({seconds:.1f} s)"


def error_outcome(err: BaseException) -> Outcome:
    """FAIL with the exception's type and first line, and the end of its traceback as details."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    trace = traceback.format_exception(type(err), err, err.__traceback__)
    tail = [line for chunk in trace[-4:] for line in chunk.rstrip().splitlines()]
    return Outcome("FAIL", f"{type(err).__name__}: {first}", details=tail[-12:])


# ------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    """How much each item does (``FULL`` on a GPU; ``SMOKE`` for a quick pass of the logic)."""

    fused_steps: int  # item 2: steps per configuration
    fused_scale: float  # item 2: width multiplier of its parameter shapes
    sync_steps: int  # item 3: VRAdam steps counted per path
    lanczos_products: tuple[int, int]  # item 3: the two product budgets
    replays: int  # item 4
    replay_scale: float  # item 4: GPT-2 width multiplier
    gpt2_scale: float  # item 5
    resnet_width: float  # item 5
    timing_repeats: int  # item 5: interleaved rounds
    timing_per_batch: int  # item 5: steps per timed sample
    copy_bytes: int  # item 5: the copied buffer
    n_examples: int  # item 6: images for the MLP and the CNN
    image_side: int  # item 6: height and width of random images (real ones keep theirs)
    lm_windows: int | None  # item 6: the language model's tracking windows (None: the task's default)
    lm_context: int | None  # item 6: its context (None: the task's default)
    lm_model_options: tuple[tuple[str, int], ...]  # item 6: its model options (empty: the task's defaults)
    solver_max_iter: int  # item 6: product budget of a solve
    reference_max_iter: int  # item 6: product budget of the tight reference
    hvp_repeats: int  # item 6
    eigsh_restarts: int  # item 6: ARPACK's maxiter (restarts of about 20 products each)
    demo_steps: int | None  # item 7 (None: the demo's own)
    demo_overrides: tuple[tuple[str, object], ...]  # item 7: RunConfig values changed (empty: the demo's own)
    pytest_timeout_s: int  # item 1


FULL = Sizes(fused_steps=50, fused_scale=1.0, sync_steps=3, lanczos_products=(8, 16), replays=100,
             replay_scale=0.125, gpt2_scale=1.0, resnet_width=1.0, timing_repeats=20, timing_per_batch=5,
             copy_bytes=512 << 20, n_examples=1000, image_side=28, lm_windows=None, lm_context=None,
             lm_model_options=(), solver_max_iter=200, reference_max_iter=300, hvp_repeats=10, eigsh_restarts=30,
             demo_steps=None, demo_overrides=(), pytest_timeout_s=300)
SMOKE = Sizes(fused_steps=2, fused_scale=0.04, sync_steps=1, lanczos_products=(4, 8), replays=3,
              replay_scale=0.01, gpt2_scale=0.01, resnet_width=0.05, timing_repeats=2, timing_per_batch=1,
              copy_bytes=1 << 20, n_examples=20, image_side=8, lm_windows=4, lm_context=8,
              lm_model_options=(("n_layer", 1), ("n_head", 2), ("d_model", 16)), solver_max_iter=40,
              reference_max_iter=40, hvp_repeats=1, eigsh_restarts=1, demo_steps=4,
              demo_overrides=(("n_train", 100), ("density_probes", 1), ("density_steps", 4)), pytest_timeout_s=300)


@dataclass(frozen=True)
class Settings:
    """One run of the check: where, how much, and which data item 6 may use."""

    device: torch.device
    sizes: Sizes
    smoke: bool = False
    data: str = "auto"  # item 6: "auto" (real data where present) or "random"
    data_dir: str | None = None
    seed: int = 0


def release_memory(device: torch.device) -> None:
    """Free what the last item left, so the next one starts with the device's memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------- item 1: gpu tests


SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b")


def parse_pytest_summary(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 passed, 2 skipped, 640 deselected in 9.1s``).

    Keys: passed, failed, skipped, deselected, errors, xfailed, xpassed,
    warnings (singular forms normalised); {} when there is no summary line.

    >>> parse_pytest_summary("x\\n= 1 failed, 3 passed, 1 error, 2 warnings in 4.2s =")
    {'failed': 1, 'passed': 3, 'errors': 1, 'warnings': 2}
    >>> parse_pytest_summary("12 skipped, 657 deselected in 6.44s")
    {'skipped': 12, 'deselected': 657}
    """
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and SUMMARY_COUNT.search(line):
            counts = {}
            for number, word in SUMMARY_COUNT.findall(line):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {}


def pytest_outcome(counts: dict[str, int], returncode: int, output: str) -> Outcome:
    """Item 1's verdict from pytest's counts, exit code and ``-ra`` report lines.

    FAIL on a failure or an error (or an exit code other than 0, or 5 for
    "no tests collected"), SKIP when nothing passed, PASS otherwise.
    """
    shown = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
    facts = ", ".join(f"{counts.get(key, 0)} {key}" for key in shown if key in counts or key in shown[:4])
    report = [line.strip() for line in output.splitlines()
              if line.startswith(("FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"))]
    data = {"counts": counts, "returncode": returncode}
    if counts.get("failed", 0) or counts.get("errors", 0) or returncode not in (0, 5):
        tail = report or output.strip().splitlines()[-15:]
        return Outcome("FAIL", f"{facts} (pytest exit code {returncode})", tail, data)
    if not counts.get("passed", 0):
        reason = next((line for line in report if line.startswith("SKIPPED")), "no gpu test was collected")
        return Outcome("SKIP", f"{facts}: no gpu test ran here ({reason})", report, data)
    return Outcome("PASS", facts, report, data)


def gpu_tests(settings: Settings) -> Outcome:
    """Item 1: every ``gpu``-marked test, in a pytest subprocess at the repository root."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=settings.sizes.pytest_timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome("FAIL", f"pytest -m gpu did not finish within {settings.sizes.pytest_timeout_s} s")
    output = proc.stdout + proc.stderr
    return pytest_outcome(parse_pytest_summary(output), proc.returncode, output)


# ------------------------------------------------ item 2: fused vs reference


# (param dtype, moment dtype) per configuration: 16-bit parameters with float32 moments (mixed precision),
# and bf16 moments for bf16 parameters (what VRAdam keeps for a bf16 model).
STORAGE_LAYOUTS = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                   (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16))
# Per storage dtype, (rtol, floor) of |fused - reference rounded to that dtype| <= rtol |reference| + floor max
# |reference| (the largest of the tensor): rtol is float32 arithmetic for float32 and one unit in the last place
# for the 16-bit dtypes; the floor is float32 rounding where terms cancel (v = b1 v + (1 - b1) g near 0).
STEP_TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2.0 ** -7, 1e-6), torch.float16: (2.0 ** -10, 1e-6)}
# 16-bit moments: the fused update reads v and m as stored, each rounded by up to 2^-7 relative (where the
# cast truncates, as Triton's interpreter does; half that rounding to nearest), the float64 reference reads
# them unrounded: the update v / sqrt(m) may differ by 1.5 x 2^-7 of itself, so parameters get 2^-6 of the
# step's update as extra room.
ROUNDED_MOMENT_SLACK = 2.0 ** -6
ETA_RTOL = 1e-5  # eta_t: float32 in the fused step
COMPARISON_HYPERS = (
    dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=1.0, alpha1=10.0, eps=1e-8, weight_decay=0.1, maximize=False),
    dict(lr=5e-3, beta1=0.8, beta2=0.99, beta3=3.0, alpha1=2.0, eps=1e-6, weight_decay=0.0, maximize=True),
)
GRADIENT_SCALE = 1e-2
STATE_KINDS = ("params", "exp_avgs", "exp_avg_sqs")
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def tolerance_text() -> str:
    """The per-dtype tolerance, as the item states it.

    >>> tolerance_text().split("; ")[0]
    'fp32 1e-05|x| + 1e-06 max|x|'
    """
    parts = [f"{SHORT_DTYPE[d]} {_power_of_two(rtol)}|x| + {floor:g} max|x|"
             for d, (rtol, floor) in STEP_TOLERANCE.items()]
    return "; ".join(parts) + f" (+ {_power_of_two(ROUNDED_MOMENT_SLACK)}|update| on params with bf16 moments)"


def _power_of_two(x: float) -> str:
    exponent = round(math.log2(x))
    return f"2^{exponent}" if 2.0 ** exponent == x else f"{x:g}"


def comparison_groups(device: torch.device, param_dtype: torch.dtype, moment_dtype: torch.dtype, *,
                      scale: float, seed: int) -> list[GroupTensors]:
    """Two param groups (hyperparameters :data:`COMPARISON_HYPERS`), with step counts on the device as
    ``fused=True`` keeps them.

    Shapes: matrices, vectors, a transposed (dense, non-contiguous) matrix and
    an odd length; widths times ``scale`` (about 135 k values at 1).
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def n(size: int) -> int:
        return max(2, round(size * scale))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device) * 0.1

    values = [[randn(n(256), n(384)), randn(n(384)), randn(n(200), n(96)).t(), randn(n(1001))],
              [randn(n(128), n(128)), randn(7, 5, 3)]]
    groups = []
    for group_values, hyper in zip(values, COMPARISON_HYPERS):
        params = [v.to(param_dtype) for v in group_values]  # the layout is kept (transposed stays transposed)
        groups.append(GroupTensors(
            params=params, grads=[torch.empty_like(p) for p in params],
            exp_avgs=[torch.zeros_like(p, dtype=moment_dtype) for p in params],
            exp_avg_sqs=[torch.zeros_like(p, dtype=moment_dtype) for p in params],
            steps=[torch.zeros((), dtype=torch.float32, device=device) for _ in params], **hyper))
    return groups


def copy_groups(groups: list[GroupTensors], dtype: torch.dtype | None = None) -> list[GroupTensors]:
    """Deep copies, layouts kept; every tensor but the step counts cast to ``dtype`` when given."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, dtype=dtype or t.dtype).copy_(t)

    return [dataclasses.replace(g, params=[copy(t) for t in g.params], grads=[copy(t) for t in g.grads],
                                exp_avgs=[copy(t) for t in g.exp_avgs], exp_avg_sqs=[copy(t) for t in g.exp_avg_sqs],
                                steps=[s.clone() for s in g.steps]) for g in groups]


def fill_gradients(groups: list[GroupTensors], generator: torch.Generator, scale: float) -> None:
    """New random gradients, written into the gradient tensors (their layout kept)."""
    for g in groups:
        for grad in g.grads:
            fresh = torch.randn(grad.shape, generator=generator, device=grad.device) * scale
            grad.copy_(fresh)


def difference_and_ratio(actual: torch.Tensor, expected: torch.Tensor, *, slack: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max |actual - e|, max |actual - e| / bound)``, ``e`` the float64 ``expected`` rounded to ``actual``'s dtype.

    ``bound = rtol |e| + floor max |e|`` from :data:`STEP_TOLERANCE` of that
    dtype, plus ``slack`` (elementwise) where given; 0-dim float64 tensors, no sync.

    >>> d, r = difference_and_ratio(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 3e-5], dtype=torch.float64))
    >>> f"{float(d):.1e} {float(r):.2f}"
    '3.0e-05 1.37'
    """
    if actual.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=actual.device)
        return zero, zero
    rtol, floor = STEP_TOLERANCE[actual.dtype]
    rounded = expected.to(actual.dtype).double()
    diff = (actual.double() - rounded).abs()
    bound = rtol * rounded.abs() + floor * rounded.abs().max()
    if slack is not None:
        bound = bound + slack
    return diff.max(), (diff / bound.clamp_min(torch.finfo(torch.float64).tiny)).max()


def compare_with_reference(device: torch.device, param_dtype: torch.dtype, moment_dtype: torch.dtype, *,
                           gate: str, norm_scope: str, steps: int, scale: float, impl: str = "fused",
                           seed: int = 0) -> dict[str, float]:
    """Step ``impl`` ``steps`` times; before each step, the float64 reference takes the same step from the same state.

    Returns, over all steps: ``max_abs_<kind>`` and ``ratio_<kind>`` (largest
    difference over its tolerance, :func:`difference_and_ratio`) for params,
    exp_avgs and exp_avg_sqs, ``max_step_difference``, ``max_eta_rel`` and
    ``clamp_mismatches``, ``clamped_steps`` (group-steps the clamp was on).
    The results are read back once, at the end.
    """
    from vradam.functional import vradam_step

    options = dict(gate=gate, power=2.0, norm_scope=norm_scope)
    groups = comparison_groups(device, param_dtype, moment_dtype, scale=scale, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    worst = {f"{m}_{kind}": zero for m in ("max_abs", "ratio") for kind in STATE_KINDS}
    worst.update(max_step_difference=zero, max_eta_rel=zero, clamp_mismatches=zero, clamped_steps=zero)
    rounded_moments = moment_dtype != torch.float32
    for _ in range(steps):
        fill_gradients(groups, generator, GRADIENT_SCALE)
        reference = copy_groups(groups, torch.float64)
        params_before = [p.clone() for g in reference for p in g.params]
        telemetry = vradam_step(groups, **options, impl=impl)
        expected = vradam_step(reference, **options, impl="reference")
        for kind in STATE_KINDS:
            actual_all = [t for g in groups for t in getattr(g, kind)]
            expected_all = [t for g in reference for t in getattr(g, kind)]
            for i, (a, e) in enumerate(zip(actual_all, expected_all)):
                slack = None
                if kind == "params" and rounded_moments:
                    slack = ROUNDED_MOMENT_SLACK * (e - params_before[i]).abs()
                diff, ratio = difference_and_ratio(a, e, slack=slack)
                worst[f"max_abs_{kind}"] = torch.maximum(worst[f"max_abs_{kind}"], diff)
                worst[f"ratio_{kind}"] = torch.maximum(worst[f"ratio_{kind}"], ratio)
        step_diff = torch.stack([(a.double() - e.double()).abs() for g, r in zip(groups, reference)
                                 for a, e in zip(g.steps, r.steps)]).max()
        worst["max_step_difference"] = torch.maximum(worst["max_step_difference"], step_diff)
        for tel, ref in zip(telemetry, expected):
            eta_rel = (tel.eta.double() - ref.eta.double()).abs() / ref.eta.double().abs()
            worst["max_eta_rel"] = torch.maximum(worst["max_eta_rel"], eta_rel)
            worst["clamp_mismatches"] = worst["clamp_mismatches"] + (tel.clamped != ref.clamped).double()
            worst["clamped_steps"] = worst["clamped_steps"] + ref.clamped.double()
    names = list(worst)
    values = torch.stack([worst[n] for n in names]).tolist()  # sync: the comparison's results, once
    return dict(zip(names, values))


def _nan_as_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def comparison_passes(result: dict[str, float]) -> bool:
    """Within every tolerance: differences over their bounds <= 1, equal step counts and clamp flags, eta close.

    >>> ok = dict(ratio_params=0.5, ratio_exp_avgs=0.1, ratio_exp_avg_sqs=1.0, max_step_difference=0.0,
    ...           max_eta_rel=1e-7, clamp_mismatches=0.0)
    >>> comparison_passes(ok), comparison_passes(dict(ok, ratio_params=1.5))
    (True, False)
    """
    return (all(result[f"ratio_{kind}"] <= 1.0 for kind in STATE_KINDS) and result["max_step_difference"] == 0
            and result["max_eta_rel"] <= ETA_RTOL and result["clamp_mismatches"] == 0)


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device`` in this process, or None."""
    if not fused_triton.is_available():
        return "Triton is not installed (pip install 'eos-toolkit[fused]')"
    if device.type == "cuda" or (device.type == "cpu" and fused_triton.is_interpreted()):
        return None
    return f"the fused kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1 (device here: {device})"


def fused_against_reference(settings: Settings, impl: str = "fused",
                            layouts: Sequence[tuple[torch.dtype, torch.dtype]] = STORAGE_LAYOUTS) -> Outcome:
    """Item 2.  ``impl`` and ``layouts`` run the same comparison for another implementation (the foreach
    path takes moments of the parameters' dtype only)."""
    device, sizes = settings.device, settings.sizes
    if impl == "fused" and (reason := fused_unavailable_reason(device)) is not None:
        return Outcome("SKIP", reason)
    rows, details, worst = [], [], 0.0
    for param_dtype, moment_dtype in layouts:
        for gate in GATES:
            for norm_scope in NORM_SCOPES:
                result = compare_with_reference(device, param_dtype, moment_dtype, gate=gate, norm_scope=norm_scope,
                                                steps=sizes.fused_steps, scale=sizes.fused_scale, impl=impl,
                                                seed=settings.seed)
                ok = comparison_passes(result)
                label = f"{SHORT_DTYPE[param_dtype]}/{SHORT_DTYPE[moment_dtype]} {gate}/{norm_scope}"
                worst = max(worst, *(_nan_as_inf(result[f"ratio_{kind}"]) for kind in STATE_KINDS))
                rows.append(dict(params=SHORT_DTYPE[param_dtype], moments=SHORT_DTYPE[moment_dtype], gate=gate,
                                 norm_scope=norm_scope, passed=ok, **result))
                details.append(
                    f"{label:<28} max |dp| {result['max_abs_params']:.1e}, |dv| {result['max_abs_exp_avgs']:.1e}, "
                    f"|dm| {result['max_abs_exp_avg_sqs']:.1e}; worst |d|/tol "
                    f"{max(_nan_as_inf(result[f'ratio_{k}']) for k in STATE_KINDS):.2f}; "
                    f"eta rel {result['max_eta_rel']:.1e}; clamped {int(result['clamped_steps'])}/"
                    f"{2 * sizes.fused_steps} group-steps: {'ok' if ok else 'MISMATCH'}")
    by_dtype = {}
    for row in rows:
        by_dtype[row["params"]] = max(by_dtype.get(row["params"], 0.0), _nan_as_inf(row["max_abs_params"]))
    failed = [row for row in rows if not row["passed"]]
    facts = (f"{impl} vs float64 reference, {len(rows)} configurations (param/moment dtype x gate x scope) x "
             f"{sizes.fused_steps} steps: {len(rows) - len(failed)} within tolerance, worst |diff|/tolerance "
             f"{worst:.2f}; max |dparam| " + ", ".join(f"{k} {v:.1e}" for k, v in by_dtype.items())
             + f"; tolerance {tolerance_text()}")
    details.append(f"each step: the reference starts from the {impl} state before it; its result rounded to the "
                   "storage dtype")
    return Outcome("FAIL" if failed else "PASS", facts, details, {"configurations": rows})


# ---------------------------------------------------------- item 3: syncs


SYNC_MESSAGE = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"
DELIBERATE_MARK = "# sync:"


@dataclass(frozen=True)
class SyncSite:
    """Where a synchronisation came from: the innermost line of this project on the stack."""

    path: str  # relative to the repository root; OUTSIDE.path when no project frame was on the stack
    line: int
    deliberate: bool  # the statement, or the comment right above it, carries "# sync:"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" + (" (# sync:)" if self.deliberate else "")


OUTSIDE = SyncSite("<outside this project>", 0, False)


def project_path(filename: str, root: Path = ROOT) -> str | None:
    """``filename`` relative to ``root`` when it is this project's source, else None (installed packages too).

    >>> project_path(str(ROOT / "eos_toolkit" / "solvers.py"))
    'eos_toolkit/solvers.py'
    >>> project_path(str(ROOT / ".venv/lib/python3.11/site-packages/torch/_tensor.py")) is None
    True
    """
    try:
        relative = Path(filename).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if any(part in ("site-packages", "dist-packages") or part.startswith(".") for part in relative.parts):
        return None
    return relative.as_posix()


def lines_that_mark(source: str, line: int) -> list[str]:
    """The lines that can mark a sync on ``line`` deliberate: its innermost statement from its first line
    to ``line``, and the comment lines directly above that statement.

    >>> src = "x = 1\\n# sync: once\\ny = f(\\n    x)\\nz = 2  # sync: here\\n"
    >>> lines_that_mark(src, 4)
    ['# sync: once', 'y = f(', '    x)']
    >>> lines_that_mark(src, 1)
    ['x = 1']
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    start = line
    if tree is not None:
        best = None
        for node in ast.walk(tree):
            contains = isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno)
            if contains and (best is None or node.lineno >= best.lineno):  # the innermost: the latest start
                best = node
        if best is not None:
            start = best.lineno
    lines = source.splitlines()
    first = start
    while first > 1 and lines[first - 2].strip().startswith("#"):
        first -= 1
    return lines[first - 1:line]


@functools.cache
def is_marked_deliberate(path: str, line: int, root: Path = ROOT) -> bool:
    """Whether the statement at ``path:line`` (relative to ``root``) is marked ``# sync:`` (:func:`lines_that_mark`)."""
    try:
        source = (root / path).read_text()
    except OSError:
        return False
    return any(DELIBERATE_MARK in text for text in lines_that_mark(source, line))


def sync_site(frames: Sequence[traceback.FrameSummary], root: Path = ROOT) -> SyncSite:
    """The innermost frame of this project's source among ``frames`` (outermost first), as a :class:`SyncSite`."""
    for frame in reversed(frames):
        path = project_path(frame.filename, root)
        if path is not None:
            return SyncSite(path, frame.lineno, is_marked_deliberate(path, frame.lineno, root))
    return OUTSIDE


@contextlib.contextmanager
def sync_debug_mode(mode: str, set_mode: Callable[[str], None] | None = None):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block, "default" after it."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode("default")


@contextlib.contextmanager
def recorded_syncs(set_mode: Callable[[str], None] | None = None, root: Path = ROOT):
    """Every host-device synchronisation torch reports inside the block, as a list of :class:`SyncSite`.

    Sync debug mode "warn" makes torch warn at each synchronising call; each
    such warning is recorded (not printed) with the innermost line of this
    project on the stack at that moment, so a count is a real count and each
    sync has a place.  Other warnings pass on as usual.  ``set_mode``
    replaces ``torch.cuda.set_sync_debug_mode`` (tests fake it on a CPU).
    The list fills while the block runs; read it after.
    """
    sites: list[SyncSite] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}")
        passed_on = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message).lower():
                sites.append(sync_site(traceback.extract_stack(sys._getframe(1)), root))
            else:
                passed_on(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        with sync_debug_mode("warn", set_mode):
            yield sites


def split_by_growth(short: collections.Counter, long: collections.Counter
                    ) -> tuple[dict[SyncSite, tuple[int, int]], dict[SyncSite, tuple[int, int]]]:
    """Sites of two runs that differ only in length: ``(once per run, growing with the length)``, each
    ``{site: (count in the short run, count in the long run)}``.

    >>> a, b = SyncSite("s.py", 1, True), SyncSite("s.py", 9, False)
    >>> once, growing = split_by_growth(collections.Counter({a: 5, b: 3}), collections.Counter({a: 9, b: 3}))
    >>> once
    {SyncSite(path='s.py', line=9, deliberate=False): (3, 3)}
    >>> growing
    {SyncSite(path='s.py', line=1, deliberate=True): (5, 9)}
    """
    once, growing = {}, {}
    for site in sorted(set(short) | set(long), key=lambda s: (s.path, s.line)):
        counts = (short.get(site, 0), long.get(site, 0))
        (growing if counts[1] > counts[0] else once)[site] = counts
    return once, growing


def describe_sites(sites: dict[SyncSite, tuple[int, int]] | collections.Counter) -> str:
    """``path:line xN`` (or ``a->b``) per site, for a detail line.

    >>> describe_sites(collections.Counter({SyncSite("a.py", 3, False): 2}))
    'a.py:3 x2'
    """
    if not sites:
        return "none"
    parts = []
    for site, count in sites.items():
        parts.append(f"{site} " + (f"{count[0]}->{count[1]}" if isinstance(count, tuple) else f"x{count}"))
    return ", ".join(parts)


def optimizer_step_syncs(make_optimizer: Callable[[list], torch.optim.Optimizer], shapes, device: torch.device,
                         steps: int, seed: int = 0) -> tuple[collections.Counter, str | None]:
    """Syncs in ``steps`` optimizer steps after a first one (which creates the state), and the error of one
    more step under sync debug mode "error" (None when it raised nothing)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=device) * 0.01
    optimizer = make_optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}])
    optimizer.step()
    synchronize(device)  # sync: outside the counted steps (the first step's work is done)
    with recorded_syncs() as sites:
        for _ in range(steps):
            optimizer.step()
    error = None
    try:
        with sync_debug_mode("error"):
            optimizer.step()
    except RuntimeError as err:
        error = str(err).splitlines()[0]
    synchronize(device)  # sync: outside the counted steps (an error of the kernels surfaces here)
    return collections.Counter(sites), error


def lanczos_sync_counts(op, products: tuple[int, int], seed: int = 0
                        ) -> tuple[collections.Counter, collections.Counter]:
    """Syncs of two Lanczos solves with ``tol=0`` (every product runs) and budgets ``products``, after an
    uncounted one."""
    from eos_toolkit.solvers import lanczos

    def solve(budget: int):
        return lanczos(op, 1, tol=0.0, max_iter=budget, generator=torch.Generator(device=op.device).manual_seed(seed))

    solve(products[0])
    counts = []
    for budget in products:
        with recorded_syncs() as sites:
            solve(budget)
        counts.append(collections.Counter(sites))
    return counts[0], counts[1]


def random_mlp_operator(device: torch.device, n: int = 256, seed: int = 0):
    """The edge-of-stability MLP's Hessian (MSE on one-hot targets) over ``n`` random inputs."""
    from eos_toolkit.hvp import hessian_operator
    from experiments.models import build_model

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=generator).to(device)
    y = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float().to(device)
    model = build_model("mlp-tanh", (1, 28, 28), 10, seed=seed).to(device)
    return hessian_operator(model, torch.nn.functional.mse_loss, [(x, y)])


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, for a line that goes on.

    >>> first_line(ValueError("bad value\\nmore"))
    'ValueError: bad value'
    """
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def vradam_step_syncs(device: torch.device, steps: int, seed: int) -> tuple[list[str], dict, list[str]]:
    """Syncs of the VRAdam step on each path (foreach, foreach capturable, fused): (details, data, problems)."""
    from experiments.benchmarks.optimizer_step import mlp_shapes
    from vradam import VRAdam

    paths = {"foreach": lambda groups: VRAdam(groups, foreach=True),
             "foreach capturable": lambda groups: VRAdam(groups, foreach=True, capturable=True),
             "fused": lambda groups: VRAdam(groups, fused=True)}
    details, data, problems = [], {}, []
    for name, make in paths.items():
        if name == "fused" and (reason := fused_unavailable_reason(device)) is not None:
            details.append(f"VRAdam {name}: skipped ({reason})")
            continue
        try:
            counts, error = optimizer_step_syncs(make, mlp_shapes(), device, steps, seed)
        except Exception as err:  # noqa: BLE001 (the other paths are still measured)
            problems.append(f"VRAdam {name}: {first_line(err)}")
            continue
        data[name] = {"syncs": sum(counts.values()), "sites": {str(s): c for s, c in counts.items()},
                      "error_mode": error}
        details.append(f"VRAdam {name}: {sum(counts.values())} syncs in {steps} steps ({describe_sites(counts)}); "
                       f"one step under mode 'error': {'no error' if error is None else 'raised ' + error}")
        if counts or error is not None:
            problems.append(f"the VRAdam {name} step synchronises")
    return details, data, problems


def lanczos_loop_syncs(device: torch.device, products: tuple[int, int], seed: int, n_examples: int = 256
                       ) -> tuple[list[str], dict, list[str]]:
    """Syncs of Lanczos on the MLP's Hessian, told apart by growth and marking: (details, data, problems)."""
    op = random_mlp_operator(device, n_examples, seed=seed)
    with recorded_syncs() as product_sites:
        op.matvec(torch.ones(op.dim, device=device))
    once, growing = split_by_growth(*lanczos_sync_counts(op, products, seed))
    deliberate = {s: c for s, c in growing.items() if s.deliberate}
    unmarked = {s: c for s, c in growing.items() if not s.deliberate}
    a, b = products
    details = [
        f"Lanczos on the MLP's Hessian (random inputs, {op.dim:,} parameters), tol=0, {a} and {b} products:",
        f"  in the loop (growing with the products), deliberate: {describe_sites(deliberate)}",
        f"  in the loop, unmarked: {describe_sites(unmarked)}",
        f"  once per solve (set-up and result, outside the loop): {describe_sites(once)}",
        (f"  one Hessian-vector product alone: {len(product_sites)} syncs "
         f"({describe_sites(collections.Counter(product_sites))})"),
    ]
    data = {"products": [a, b], "loop_deliberate": {str(s): c for s, c in deliberate.items()},
            "loop_unmarked": {str(s): c for s, c in unmarked.items()},
            "once_per_solve": {str(s): c for s, c in once.items()}, "product": len(product_sites)}
    problems = ["unmarked syncs inside the Lanczos loop"] if unmarked else []
    return details, data, problems


def sync_counts(settings: Settings) -> Outcome:
    """Item 3."""
    device, sizes = settings.device, settings.sizes
    if device.type != "cuda":
        return Outcome("SKIP", "sync debug mode needs CUDA (torch.cuda.set_sync_debug_mode)")
    with recorded_syncs() as control:
        torch.ones((), device=device).item()  # a call that syncs: the counter must see it
    control_text = f"{len(control)} sync(s) ({describe_sites(collections.Counter(control))})"
    details = [f"control: .item() of a CUDA tensor counted {control_text}"]
    data = {"control": len(control)}
    problems = [] if control else ["the counter saw no sync in .item() of a CUDA tensor: counting does not work here"]
    step_details, data["vradam"], step_problems = vradam_step_syncs(device, sizes.sync_steps, settings.seed)
    details += step_details
    problems += step_problems
    try:
        loop_details, data["lanczos"], loop_problems = lanczos_loop_syncs(device, sizes.lanczos_products,
                                                                          settings.seed)
    except Exception as err:  # noqa: BLE001 (the step's counts above still stand)
        loop_details, data["lanczos"], loop_problems = [], {}, [f"Lanczos: {first_line(err)}"]
    details += loop_details
    problems += loop_problems
    steps_text = ", ".join(f"{name} {entry['syncs']}" for name, entry in data["vradam"].items()) or "none measured"
    facts = f"VRAdam step syncs in {sizes.sync_steps} steps: {steps_text}"
    if data["lanczos"]:
        loop = data["lanczos"]
        deliberate = "->".join(str(sum(c[i] for c in loop["loop_deliberate"].values())) for i in (0, 1))
        facts += (f"; Lanczos loop ({loop['products'][0]} vs {loop['products'][1]} products): "
                  f"{sum(c[1] for c in loop['loop_unmarked'].values())} unmarked, {deliberate} deliberate "
                  f"(convergence tests), {sum(c[1] for c in loop['once_per_solve'].values())} once per solve "
                  "outside the loop")
    facts += f"; control .item() counted {len(control)}"
    if problems:
        facts += "; " + "; ".join(problems)
    return Outcome("FAIL" if problems else "PASS", facts, details, data)


# ---------------------------------------------------- item 4: graph replay


REPLAY_OPTIONS = dict(gate="velocity", power=2.0, norm_scope="global")


def next_gradients(grads: list[torch.Tensor]) -> None:
    """The next step's gradients, in place (a graph reads them where they are): sign flipped, 1% larger."""
    torch._foreach_mul_(grads, -1.01)


def state_differences(a: list[GroupTensors], b: list[GroupTensors], tel_a: list[Telemetry],
                      tel_b: list[Telemetry]) -> dict[str, float]:
    """Largest normwise differences (``max |a - b| / max |b|``) of params and moments, largest step-count and
    telemetry differences, and whether everything is bitwise equal; read back once."""
    out = {}
    for kind in STATE_KINDS:
        ratios = [(x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)
                  for ga, gb in zip(a, b) for x, y in zip(getattr(ga, kind), getattr(gb, kind)) if x.numel()]
        out[f"normwise_{kind}"] = torch.stack(ratios).max()
    out["max_step_difference"] = torch.stack([(x - y).abs() for ga, gb in zip(a, b)
                                              for x, y in zip(ga.steps, gb.steps)]).max().double()
    out["max_eta_rel"] = torch.stack([((x.eta.double() - y.eta.double()) / y.eta.double()).abs()
                                      for x, y in zip(tel_a, tel_b)]).max()
    out["clamp_mismatches"] = torch.stack([(x.clamped != y.clamped).double() for x, y in zip(tel_a, tel_b)]).sum()
    equal = all(torch.equal(x, y) for ga, gb in zip(a, b) for kind in (*STATE_KINDS, "steps")
                for x, y in zip(getattr(ga, kind), getattr(gb, kind)))
    names = list(out)
    values = torch.stack([out[n].to(torch.float64) for n in names]).tolist()  # sync: the comparison, once
    return {**dict(zip(names, values)), "bitwise_equal": equal}


def replay_against_eager(replay: Callable[[], list[Telemetry]], replay_groups: list[GroupTensors],
                         eager: Callable[[], list[Telemetry]], eager_groups: list[GroupTensors],
                         grads: list[torch.Tensor], steps: int) -> dict[str, float]:
    """``steps`` rounds of: new gradients (shared, in place), one replayed step, one eager step; then
    :func:`state_differences`."""
    tel_replay = tel_eager = None
    for _ in range(steps):
        next_gradients(grads)
        tel_replay = replay()
        tel_eager = eager()
    return state_differences(replay_groups, eager_groups, tel_replay, tel_eager)


def replay_passes(result: dict[str, float], rtol: float = 1e-6) -> bool:
    """Replayed and eager states agree to ``rtol`` (normwise), with equal step counts and clamp flags.

    >>> replay_passes(dict(normwise_params=0.0, normwise_exp_avgs=0.0, normwise_exp_avg_sqs=1e-9,
    ...                    max_step_difference=0.0, max_eta_rel=0.0, clamp_mismatches=0.0))
    True
    """
    return (all(result[f"normwise_{kind}"] <= rtol for kind in STATE_KINDS) and result["max_step_difference"] == 0
            and result["max_eta_rel"] <= rtol and result["clamp_mismatches"] == 0)


def captured_step(step: Callable[[], list[Telemetry]], device: torch.device
                  ) -> tuple[torch.cuda.CUDAGraph, list[Telemetry]]:
    """One step captured in a CUDA graph (after a warm-up step on a side stream that builds the chunk
    tables), and the telemetry tensors the graph writes at each replay."""
    from experiments.benchmarks.fused_step import capture_step

    captured: list[list[Telemetry]] = []
    graph = capture_step(lambda: captured.append(step()), device)
    return graph, captured[-1]  # the capture's own call: its outputs live in the graph's memory


def graph_replay(settings: Settings) -> Outcome:
    """Item 4."""
    from experiments.benchmarks.fused_step import make_param_set
    from experiments.benchmarks.optimizer_step import gpt2_small_shapes

    device, sizes = settings.device, settings.sizes
    if device.type != "cuda":
        return Outcome("SKIP", "CUDA graphs need CUDA")
    if (reason := fused_unavailable_reason(device)) is not None:
        return Outcome("SKIP", reason)
    shapes = gpt2_small_shapes(sizes.replay_scale)
    param_set = make_param_set(shapes, device, seed=settings.seed)
    graph_groups, eager_groups = param_set.groups(), param_set.groups()  # same gradient tensors, own state
    graph, graph_telemetry = captured_step(lambda: fused_triton.fused_step(graph_groups, **REPLAY_OPTIONS), device)
    fused_triton.fused_step(eager_groups, **REPLAY_OPTIONS)  # the twin of the capture's warm-up step

    def replay() -> list[Telemetry]:
        graph.replay()
        return graph_telemetry

    result = replay_against_eager(replay, graph_groups, lambda: fused_triton.fused_step(eager_groups, **REPLAY_OPTIONS),
                                  eager_groups, param_set.grads, sizes.replays)
    ok = replay_passes(result)
    facts = (f"{sizes.replays} replays vs {sizes.replays} eager fused steps ({len(shapes)} tensors, "
             f"{param_set.numel / 1e6:.1f} M values, new gradients each step): "
             f"{'bitwise equal' if result['bitwise_equal'] else 'not bitwise equal'}, largest normwise difference "
             f"{max(result[f'normwise_{k}'] for k in STATE_KINDS):.1e}, step counts "
             f"{'equal' if result['max_step_difference'] == 0 else 'differ'}, eta rel {result['max_eta_rel']:.1e}")
    return Outcome("PASS" if ok else "FAIL", facts, [], result)


# ----------------------------------------------------- item 5: step timing


def resnet50_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (161 tensors, 25,557,032 values at width 1), channels x ``width``.

    >>> shapes = resnet50_shapes()
    >>> len(shapes), sum(torch.Size(s).numel() for s in shapes)
    (161, 25557032)
    """
    def w(channels: int) -> int:
        return max(1, round(channels * width))

    shapes: list[tuple[int, ...]] = [(w(64), 3, 7, 7), (w(64),), (w(64),)]
    in_channels = w(64)
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            mid, out = w(planes), w(planes * 4)
            shapes += [(mid, in_channels, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,),
                       (out, mid, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    return shapes + [(1000, in_channels), (1000,)]


def device_param_set(shapes: Sequence[tuple[int, ...]], device: torch.device, seed: int = 0):
    """A :class:`~experiments.benchmarks.fused_step.ParamSet` drawn on the device itself (no host copy of 124 M
    values)."""
    from experiments.benchmarks.fused_step import ParamSet

    generator = torch.Generator(device=device).manual_seed(seed)
    initial = [torch.randn(s, generator=generator, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=generator, device=device) * 0.01 for s in shapes]
    return ParamSet(initial, grads)


def step_contenders(param_set, device: torch.device
                    ) -> tuple[dict[str, tuple[Callable[[], object], int]], dict[str, str]]:
    """``{name: (step, bytes per value the step must move)}`` for the optimizers that run here, and
    ``{name: why not}`` for the others.  Each has taken one step (its state exists)."""
    from experiments.benchmarks.fused_step import BYTES_PER_VALUE
    from vradam import VRAdam

    makers = {
        "adamw_fused": (lambda ps: torch.optim.AdamW(ps, fused=True), BYTES_PER_VALUE["adamw"]),
        "adamw_foreach": (lambda ps: torch.optim.AdamW(ps, foreach=True), BYTES_PER_VALUE["adamw"]),
        "vradam_foreach": (lambda ps: VRAdam(ps, foreach=True), BYTES_PER_VALUE["vradam_exact"]),
        "vradam_fused": (lambda ps: VRAdam(ps, fused=True), BYTES_PER_VALUE["vradam_exact"]),
    }
    contenders, missing = {}, {}
    for name, (make, nbytes) in makers.items():
        if name == "vradam_fused" and (reason := fused_unavailable_reason(device)) is not None:
            missing[name] = reason
            continue
        try:
            optimizer = make(param_set.params())
            optimizer.step()
        except (RuntimeError, ValueError) as err:
            missing[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        contenders[name] = (optimizer.step, nbytes)
    return contenders, missing


def bandwidth_rows(medians: dict[str, float], bytes_per_value: dict[str, int], numel: int, copy_seconds: float,
                   copy_bytes: int) -> list[dict]:
    """Per contender: ms, ratios to AdamW fused and foreach (None where absent), achieved GB/s and its share of the
    copy's.

    Achieved bandwidth = bytes the step must move per value x values / seconds; the copy moves
    ``2 x copy_bytes`` (a read and a write) per call.

    >>> rows = bandwidth_rows({"adamw_foreach": 2e-3, "x": 1e-3}, {"adamw_foreach": 28, "x": 36}, 10**6, 1e-3, 10**9)
    >>> [(r["name"], r["per_adamw_foreach"], r["gb_per_s"], round(r["percent_of_copy"], 2)) for r in rows]
    [('adamw_foreach', 1.0, 14.0, 0.7), ('x', 0.5, 36.0, 1.8)]
    """
    copy_rate = 2 * copy_bytes / copy_seconds
    rows = []
    for name, nbytes in bytes_per_value.items():
        seconds = medians[name]
        achieved = nbytes * numel / seconds
        rows.append({
            "name": name, "ms": seconds * 1e3,
            "per_adamw_fused": seconds / medians["adamw_fused"] if "adamw_fused" in medians else None,
            "per_adamw_foreach": seconds / medians["adamw_foreach"] if "adamw_foreach" in medians else None,
            "gb_per_s": achieved / 1e9, "percent_of_copy": 100 * achieved / copy_rate,
        })
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_bandwidth_rows(rows: list[dict]) -> list[str]:
    lines = [f"  {'step':<16}{'ms':>9}{'/ adamw_fused':>15}{'/ adamw_foreach':>17}{'GB/s':>8}{'% copy':>8}"]
    for r in rows:
        lines.append(f"  {r['name']:<16}{r['ms']:>9.3f}{_ratio(r['per_adamw_fused']):>15}"
                     f"{_ratio(r['per_adamw_foreach']):>17}{r['gb_per_s']:>8.0f}{r['percent_of_copy']:>8.0f}")
    return lines


def time_parameter_set(title: str, shapes, settings: Settings) -> tuple[list[str], dict, str]:
    """One parameter set: every contender and the copy, interleaved, timed with events; (details, data, summary)."""
    device, sizes = settings.device, settings.sizes
    param_set = device_param_set(shapes, device, settings.seed)
    contenders, missing = step_contenders(param_set, device)
    source = torch.ones(sizes.copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    jobs = {"copy": lambda: target.copy_(source), **{name: step for name, (step, _) in contenders.items()}}
    medians = interleaved_medians(jobs, device, repeats=sizes.timing_repeats, warmup=2,
                                  per_batch=sizes.timing_per_batch, clock="events")
    rows = bandwidth_rows(medians, {name: nbytes for name, (_, nbytes) in contenders.items()}, param_set.numel,
                          medians["copy"], sizes.copy_bytes)
    copy_rate = 2 * sizes.copy_bytes / medians["copy"] / 1e9
    header = (f"{title}: {len(shapes)} tensors, {param_set.numel / 1e6:.1f} M float32 values; copy of "
              f"{sizes.copy_bytes / 2**20:.0f} MiB: {copy_rate:.0f} GB/s")
    details = [header, *format_bandwidth_rows(rows)] + [f"  {name}: not timed ({why})" for name, why in missing.items()]
    best = next((r for r in rows if r["name"] == "vradam_fused"), None) or next(
        (r for r in rows if r["name"] == "vradam_foreach"), None)
    summary = title.split(",")[0]
    if best is not None:
        summary += (f" {best['name']} {best['ms']:.2f} ms = {_ratio(best['per_adamw_fused'])}x adamw_fused, "
                    f"{_ratio(best['per_adamw_foreach'])}x adamw_foreach, {best['percent_of_copy']:.0f}% of copy "
                    f"bandwidth")
        baseline = next((r for r in rows if r["name"] == "adamw_fused"), None)
        if baseline is not None:
            summary += f" (adamw_fused {baseline['percent_of_copy']:.0f}%)"
    data = {"numel": param_set.numel, "tensors": len(shapes), "copy_gb_per_s": copy_rate, "rows": rows,
            "not_timed": missing}
    return details, data, summary


def step_timing(settings: Settings) -> Outcome:
    """Item 5."""
    from experiments.benchmarks.optimizer_step import gpt2_small_shapes

    device, sizes = settings.device, settings.sizes
    if device.type != "cuda" and not settings.smoke:
        return Outcome("SKIP", "CUDA events need CUDA")
    clock = "CUDA events" if device.type == "cuda" else "the wall clock (no CUDA events here)"
    method = (f"medians of {sizes.timing_repeats} interleaved rounds of {sizes.timing_per_batch} steps, timed "
              f"with {clock}")
    details, data, summaries = [method], {}, []
    for key, title, shapes in (
        ("gpt2", f"GPT-2-small-shaped, scale {sizes.gpt2_scale:g}", gpt2_small_shapes(sizes.gpt2_scale)),
        ("resnet50", f"ResNet-50-shaped, width {sizes.resnet_width:g}", resnet50_shapes(sizes.resnet_width)),
    ):
        lines, data[key], summary = time_parameter_set(title, shapes, settings)
        details += lines
        summaries.append(summary)
        release_memory(device)
    return Outcome("PASS", "; ".join(summaries), details, data)


# ------------------------------------------------------- item 6: curvature


RANDOM_VOCABULARY = 74  # random tokens: the size of the default corpus ("auto": shakespeare, characters)
WARM_LR = 0.05  # the gradient-descent step between the cold and the warm solve


def image_data(settings: Settings) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images and one-hot targets for the MLP and the CNN: a balanced Fashion-MNIST subset where present
    (``settings.data == "auto"``), else random images of its shape; and what they are."""
    n = settings.sizes.n_examples
    if settings.data == "auto":
        from experiments.data import DatasetNotFoundError, balanced_subset, load_dataset

        try:
            data = balanced_subset(load_dataset("fashion-mnist", "train", data_dir=settings.data_dir), n, seed=0)
        except DatasetNotFoundError:
            pass
        else:
            targets = torch.nn.functional.one_hot(data.labels, data.num_classes).float()
            return data.images, targets, f"Fashion-MNIST, {n} balanced training images"
    side = settings.sizes.image_side
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.randn(n, 1, side, side, generator=generator)
    targets = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
    reason = "as asked" if settings.data == "random" else "Fashion-MNIST is not on this machine"
    return images, targets, f"RANDOM images ({n} x 1 x {side} x {side}, N(0, 1); {reason})"


def language_model_setup(settings: Settings):
    """The default language model and its tracking windows: ``(model, loss_fn, batches, what the data is)``.

    Built as ``eos run language-model`` builds it where a corpus is present
    (``settings.data == "auto"``); otherwise the same model over random tokens.
    """
    from experiments.config import RunConfig
    from experiments.models import build_transformer
    from experiments.resolve import resolve
    from experiments.tasks import base as task_base
    from experiments.tasks.language import token_cross_entropy

    device, sizes = settings.device, settings.sizes
    overrides = {}
    if sizes.lm_windows is not None:
        overrides.update(track_n=sizes.lm_windows, chunk_size=sizes.lm_windows)
    if sizes.lm_context is not None:
        overrides["context"] = sizes.lm_context
    if sizes.lm_model_options:
        overrides["model_options"] = dict(sizes.lm_model_options)
    cfg = resolve(RunConfig(task="language-model", dataset="auto", data_dir=settings.data_dir, device=device.type,
                            seed=settings.seed, **overrides))
    if settings.data == "auto":
        from experiments.data import DatasetNotFoundError
        from experiments.tasks import build_task

        try:
            task = build_task(cfg, device, torch.float32)
        except DatasetNotFoundError:
            pass
        else:
            info = task.data_info
            label = (f"{info['dataset']} ({info['level']} level, vocabulary {task.vocab_size}), {cfg.track_n} "
                     f"tracking windows of {cfg.context} tokens")
            return task.model, task.loss_fn, task.track_batches, label
    model = build_transformer(RANDOM_VOCABULARY, cfg.context, seed=cfg.seed, **cfg.model_options).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = torch.randint(0, RANDOM_VOCABULARY, (cfg.track_n, cfg.context + 1), generator=generator).to(device)
    reason = "as asked" if settings.data == "random" else "no corpus on this machine"
    return (model, token_cross_entropy, task_base.chunks(tokens[:, :-1], tokens[:, 1:], cfg.chunk_size),
            f"RANDOM tokens (vocabulary {RANDOM_VOCABULARY}, {cfg.track_n} windows of {cfg.context}; {reason})")


def curvature_models(settings: Settings) -> list[tuple[str, Callable[[], tuple]]]:
    """``(name, build)`` per model; ``build()`` returns ``(model, loss_fn, batches, what the data is)``."""
    from experiments.models import build_model
    from experiments.tasks import base as task_base

    device = settings.device

    def image_model(name: str, **options):
        def build():
            images, targets, label = image_data(settings)
            model = build_model(name, tuple(images.shape[1:]), targets.shape[1], seed=settings.seed, **options)
            batches = task_base.chunks(images.to(device), targets.to(device), len(images))
            return model.to(device), torch.nn.functional.mse_loss, batches, label
        return build

    return [("mlp", image_model("mlp-tanh")),
            ("cnn", image_model("cnn-small", width=16, activation="tanh")),
            ("lm", lambda: language_model_setup(settings))]


def hvp_gradient_ratios(model, loss_fn, batches, device: torch.device, repeats: int, seed: int = 0) -> dict:
    """Median seconds of one gradient and each product rule's product as a ratio to it (interleaved), and
    the note of any product that switched to plain kernels."""
    from eos_toolkit.batches import as_args
    from eos_toolkit.hvp import hessian_operator
    from eos_toolkit.settings import METHODS
    from experiments.tasks.base import size_weighted

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        for x, y, w in size_weighted(batches):
            torch.autograd.grad(loss_fn(model(*as_args(x)), y) * w, params)

    ops = {m: hessian_operator(model, loss_fn, batches, method=m) for m in METHODS}
    v = torch.randn(ops[METHODS[0]].dim, device=device, generator=torch.Generator(device=device).manual_seed(seed))
    jobs = {"gradient": gradient, **{m: (lambda op=op: op.matvec(v)) for m, op in ops.items()}}
    with contextlib.ExitStack() as stack:
        for op in ops.values():
            stack.enter_context(op.measurement())  # reuse_graph: its per-product cost once its graphs exist
        medians = interleaved_medians(jobs, device, repeats=repeats, warmup=1)
    notes = sorted({op.kernel_fallback for op in ops.values() if op.kernel_fallback})
    return {"gradient_seconds": medians["gradient"], **{m: medians[m] / medians["gradient"] for m in METHODS},
            "kernel_fallback": notes}


def relative_error(value: float, reference: float) -> float:
    """``|value - reference| / |reference|``.

    >>> relative_error(1.001, 1.0) < 1.1e-3
    True
    """
    return abs(value - reference) / abs(reference)


def tight_top_eigenpair(op64, *, seed: int, max_iter: int, v0=None) -> tuple[float, torch.Tensor]:
    """lambda_1 to an eigenvalue error bound of 1e-10 (relative), on float64 vectors, and its vector."""
    from eos_toolkit.solvers import lanczos

    result = lanczos(op64, 2, tol=1e-10, max_iter=max_iter, v0=v0, criterion="eigenvalue",
                     generator=torch.Generator(device=op64.device).manual_seed(seed))
    return float(result.eigenvalues[0]), result.eigenvectors[:, 0]


def lanczos_cost(op, reference: float, *, seed: int, max_iter: int, v0=None) -> dict:
    """Our Lanczos as a tracker solves (tol 1e-3 on residuals): products and seconds at its own stop, the
    error there, and the first product within 1e-3 of ``reference`` (from a second, untimed run with history)."""
    from eos_toolkit.solvers import lanczos
    from experiments.benchmarks.sharpness import first_within

    def solve(history: bool):
        return lanczos(op, 1, tol=REL_TARGET, max_iter=max_iter, v0=v0, keep_history=history,
                       generator=torch.Generator(device=op.device).manual_seed(seed))

    result, seconds = timed(lambda: solve(False), op.device)
    within = first_within(solve(True).history, reference)
    return {"products": result.n_matvecs, "seconds": seconds, "converged": result.converged,
            "error": relative_error(float(result.eigenvalues[0]), reference), "first_within": within,
            "vector": result.eigenvectors[:, 0]}


def eigsh_cost(op, reference: float, start: torch.Tensor, max_restarts: int) -> dict:
    """scipy's ``eigsh(k=1, which="LA", tol=0)`` on the same operator from ``start``: products, seconds, error."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    from eos_toolkit.operators import as_scipy_linear_operator

    before = op.n_matvecs
    v0 = start.detach().to("cpu", op.dtype).numpy()
    try:
        values, seconds = timed(lambda: eigsh(as_scipy_linear_operator(op), k=1, which="LA", tol=0, v0=v0,
                                              maxiter=max_restarts, return_eigenvectors=False), op.device)
        value, converged = float(values[0]), True
    except ArpackNoConvergence as err:
        value = float(err.eigenvalues[0]) if len(err.eigenvalues) else float("nan")
        converged, seconds = False, float("nan")
    return {"products": op.n_matvecs - before, "seconds": seconds, "converged": converged,
            "error": relative_error(value, reference)}


def gradient_descent_step(model, loss_fn, batches, lr: float) -> None:
    """``theta -= lr * grad`` of the size-weighted mean loss over the batches."""
    from eos_toolkit.batches import as_args
    from experiments.tasks.base import size_weighted

    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for x, y, w in size_weighted(batches):
        for acc, g in zip(total, torch.autograd.grad(loss_fn(model(*as_args(x)), y) * w, params)):
            acc.add_(g)
    with torch.no_grad():
        torch._foreach_add_(params, total, alpha=-lr)


def eigen_costs(model, loss_fn, batches, settings: Settings) -> dict:
    """Cold and warm costs of lambda_1 to 1e-3: our Lanczos against ``eigsh(tol=0)``, on the model-dtype operator."""
    from eos_toolkit.hvp import hessian_operator

    sizes, seed = settings.sizes, settings.seed
    op = hessian_operator(model, loss_fn, batches)  # what a tracker solves on
    op64 = hessian_operator(model, loss_fn, batches, dtype=torch.float64)  # the tight reference's
    reference, reference_vector = tight_top_eigenpair(op64, seed=seed, max_iter=sizes.reference_max_iter)
    cold = lanczos_cost(op, reference, seed=seed, max_iter=sizes.solver_max_iter)
    start = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed + 1))
    eigsh_cold = eigsh_cost(op, reference, start, sizes.eigsh_restarts)
    gradient_descent_step(model, loss_fn, batches, WARM_LR)
    after, _ = tight_top_eigenpair(op64, seed=seed, max_iter=sizes.reference_max_iter, v0=reference_vector)
    warm = lanczos_cost(op, after, seed=seed, max_iter=sizes.solver_max_iter, v0=cold["vector"])
    eigsh_warm = eigsh_cost(op, after, cold["vector"], sizes.eigsh_restarts)
    for row in (cold, warm):
        row.pop("vector")
    return {"dim": op.dim, "reference": reference, "reference_after_step": after, "cold": cold,
            "eigsh_cold": eigsh_cold, "warm": warm, "eigsh_warm": eigsh_warm}


def cost_line(label: str, ours: dict, theirs: dict) -> str:
    """One detail line: our Lanczos against eigsh(tol=0), products and seconds.

    >>> for part in cost_line("cold", dict(products=16, first_within=11, seconds=0.05, error=2e-7),
    ...                       dict(products=32, seconds=0.4, error=4e-9, converged=True)).split("; "):
    ...     print(part)
      cold: Lanczos 16 products (first within 1e-3 after 11), 0.050 s, error 2.0e-07
    eigsh(tol=0) 32 products, 0.400 s, error 4.0e-09: 2.0x the products, 8.0x the seconds
    >>> cost_line("warm", dict(products=4, first_within=None, seconds=0.05, error=2e-3),
    ...           dict(products=20, seconds=float("nan"), error=0.1, converged=False)).split("; ")[1]
    'eigsh(tol=0) did not converge in 20 products'
    """
    within = ("never within 1e-3" if ours["first_within"] is None
              else f"first within 1e-3 after {ours['first_within']}")
    text = (f"  {label}: Lanczos {ours['products']} products ({within}), {ours['seconds']:.3f} s, "
            f"error {ours['error']:.1e}; ")
    if not theirs["converged"]:
        return text + f"eigsh(tol=0) did not converge in {theirs['products']} products"
    return text + (f"eigsh(tol=0) {theirs['products']} products, {theirs['seconds']:.3f} s, error "
                   f"{theirs['error']:.1e}: {theirs['products'] / ours['products']:.1f}x the products, "
                   f"{theirs['seconds'] / ours['seconds']:.1f}x the seconds")


def curvature(settings: Settings) -> Outcome:
    """Item 6."""
    from eos_toolkit.settings import METHODS

    device = settings.device
    if device.type != "cuda" and not settings.smoke:
        return Outcome("SKIP", "measures the curvature engine on CUDA")
    details, data, summaries, statuses = [], {}, [], []
    for name, build in curvature_models(settings):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a product's switch to plain kernels is reported below
                model, loss_fn, batches, label = build()
                ratios = hvp_gradient_ratios(model, loss_fn, batches, device, settings.sizes.hvp_repeats, settings.seed)
                costs = eigen_costs(model, loss_fn, batches, settings)
        except Exception as err:  # noqa: BLE001 (one model's failure leaves the others measured)
            statuses.append("FAIL")
            details.append(f"{name}: FAIL {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")
            summaries.append(f"{name} FAIL")
            continue
        finally:
            release_memory(device)
        accurate = costs["cold"]["error"] <= REL_TARGET and costs["warm"]["error"] <= REL_TARGET
        statuses.append("PASS" if accurate else "FAIL")
        data[name] = {"data": label, "hvp_over_gradient": ratios, **costs}
        details.append(f"{name} ({costs['dim']:,} parameters; {label}): gradient "
                       f"{ratios['gradient_seconds'] * 1e3:.2f} ms; HVP / gradient "
                       + ", ".join(f"{m} {ratios[m]:.2f}" for m in METHODS))
        details += [f"  note: {note}" for note in ratios["kernel_fallback"]]
        details.append(f"  lambda_1 = {costs['reference']:.6g}, after one GD step at lr {WARM_LR}: "
                       f"{costs['reference_after_step']:.6g} (float64 Lanczos, eigenvalue bound 1e-10)")
        details.append(cost_line("cold", costs["cold"], costs["eigsh_cold"]))
        details.append(cost_line("warm, from the cold vector, one GD step later", costs["warm"], costs["eigsh_warm"]))
        eigsh_cold = costs["eigsh_cold"]
        eigsh_text = f"{eigsh_cold['products']}" + ("" if eigsh_cold["converged"] else " (unconverged)")
        summaries.append(f"{name}{' (random data)' if label.startswith('RANDOM') else ''} HVP "
                         f"{ratios['forward_over_reverse']:.1f}x gradient, Lanczos cold {costs['cold']['products']} "
                         f"vs eigsh {eigsh_text} products, warm {costs['warm']['products']}"
                         + ("" if accurate else " (error above 1e-3)"))
    return Outcome(worst_status(statuses), "; ".join(summaries), details, data)


# ----------------------------------------------------- item 7: tracked run


def tracking_share(metrics: Iterable[tuple[str, float]], wall_seconds: float) -> dict[str, float]:
    """Seconds of the record's timed tracking work (Hessian solves, preconditioned solves, spectral
    densities) and their share of the run's wall time.

    >>> tracking_share([("hessian_seconds", 1.0), ("train_loss", 0.3), ("density_seconds", 2.0)], 10.0)
    {'hessian': 1.0, 'precond': 0.0, 'density': 2.0, 'tracking': 3.0, 'share': 0.3}
    """
    from eos_toolkit import metrics as names

    kinds = {names.seconds(names.HESSIAN): "hessian", names.seconds(names.PRECOND): "precond",
             names.DENSITY_SECONDS: "density"}
    totals = dict.fromkeys(kinds.values(), 0.0)
    for metric, value in metrics:
        if metric in kinds and not math.isnan(value):  # NaN: nothing was measured
            totals[kinds[metric]] += float(value)
    tracking = sum(totals.values())
    return {**totals, "tracking": tracking, "share": tracking / wall_seconds}


def last_value(metrics: Sequence[tuple[str, float]], name: str) -> float:
    """The last recorded value of metric ``name`` (NaN when it was never recorded)."""
    return next((float(v) for m, v in reversed(metrics) if m == name), float("nan"))


def tracked_run(settings: Settings) -> Outcome:
    """Item 7."""
    from eos_toolkit import metrics as names
    from eos_toolkit.record import read_run
    from experiments.data import DatasetNotFoundError, resolve_dataset
    from experiments.demo import demo_configs
    from experiments.resolve import resolve
    from experiments.train import train

    device = settings.device
    if device.type != "cuda" and not settings.smoke:
        return Outcome("SKIP", "a tracked run on the GPU needs CUDA")
    try:
        dataset = resolve_dataset("auto", settings.data_dir)
    except DatasetNotFoundError as err:
        return Outcome("SKIP", f"the demo's data is not on this machine ({str(err).split('. ')[0]})")
    cfg = demo_configs(dataset="auto", data_dir=settings.data_dir, steps=settings.sizes.demo_steps,
                       device=device.type)["gd"]
    if settings.sizes.demo_overrides:
        cfg = resolve(dataclasses.replace(cfg, **dict(settings.sizes.demo_overrides)))
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as tmp:
        result, wall = timed(lambda: train(cfg, Path(tmp) / "gd"), device)
        record = read_run(result.run_dir)
        metrics = list(zip(record.metrics["metric"], record.metrics["value"]))
    share = tracking_share(metrics, wall)
    sharpness, threshold = last_value(metrics, names.SHARPNESS), last_value(metrics, names.THRESHOLD)
    changed = f" (changed: {dict(settings.sizes.demo_overrides)})" if settings.sizes.demo_overrides else ""
    facts = (f"eos demo's gd run on {dataset}{changed}: {result.step} steps at lr {cfg.lr:g} on {cfg.n_train} "
             f"images, tracked every {cfg.track_every} steps (k={cfg.track_k}, a spectral density every "
             f"{cfg.track_density_every}): {wall:.1f} s wall, {100 * share['share']:.0f}% in tracking "
             f"(Hessian solves {share['hessian']:.1f} s, densities {share['density']:.1f} s); status {result.status}; "
             f"last sharpness {sharpness:.1f} vs 2/eta = {threshold:.1f}")
    data = {"dataset": dataset, "steps": result.step, "status": result.status, "wall_seconds": wall, **share,
            "last_sharpness": sharpness, "threshold": threshold}
    return Outcome("PASS" if result.status == "finished" else "FAIL", facts, [], data)


# ------------------------------------------------------------------ runner


@dataclass(frozen=True)
class Item:
    name: str
    run: Callable[[Settings], Outcome]
    needs_cuda: bool  # without CUDA (and without --smoke) it says SKIP without running


ITEMS = {
    1: Item("gpu tests", gpu_tests, needs_cuda=False),
    2: Item("fused vs reference", fused_against_reference, needs_cuda=True),
    3: Item("syncs", sync_counts, needs_cuda=True),
    4: Item("graph replay", graph_replay, needs_cuda=True),
    5: Item("step timing", step_timing, needs_cuda=True),
    6: Item("curvature", curvature, needs_cuda=True),
    7: Item("tracked run", tracked_run, needs_cuda=True),
}


def parse_items(tokens: Sequence[str]) -> list[int]:
    """Item numbers from ``["2", "3,5", "6-7"]``-style tokens, in order, without repeats; all when empty.

    >>> parse_items(["2", "3,5", "6-7", "2"]), parse_items([])
    ([2, 3, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])
    """
    if not tokens:
        return list(ITEMS)
    numbers: list[int] = []
    for token in tokens:
        for part in filter(None, token.split(",")):
            low, _, high = part.partition("-")
            try:
                span = range(int(low), int(high or low) + 1)
            except ValueError:
                raise ValueError(f"item {part!r}; allowed: numbers 1-{len(ITEMS)}, lists (2,3) and ranges (2-5)"
                                 ) from None
            for number in span:
                if number not in ITEMS:
                    raise ValueError(f"item {number}; allowed: 1-{len(ITEMS)}")
                if number not in numbers:
                    numbers.append(number)
    return numbers


def skip_reason(item: Item, settings: Settings) -> str | None:
    """Why an item does not run at all here, or None."""
    if item.needs_cuda and settings.device.type != "cuda" and not settings.smoke:
        return "needs CUDA (torch.cuda.is_available() is False here)"
    return None


def machine_line(device: torch.device) -> str:
    """torch, the device, and Triton, in one line."""
    try:
        triton = f"triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "no triton"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} (compute capability {props.major}.{props.minor}, "
                 f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        where = f"{device} ({torch.get_num_threads()} threads)"
    interpreted = ", kernels interpreted (TRITON_INTERPRET=1)" if fused_triton.is_interpreted() else ""
    return f"torch {torch.__version__} on {where}; {triton}{interpreted}"


def print_now(line: str) -> None:
    print(line, flush=True)


def run_items(numbers: Sequence[int], settings: Settings, *, json_path: str | None = None,
              out: Callable[[str], None] = print_now) -> dict:
    """Run the items in order, printing each one's line and details as it ends; returns the report."""
    started = time.perf_counter()
    report = {"machine": machine_line(settings.device), "smoke": settings.smoke, "data": settings.data,
              "items": {}}
    out(f"gpu_check: {report['machine']}{'; SMOKE sizes: the numbers mean nothing' if settings.smoke else ''}")
    for number in numbers:
        item = ITEMS[number]
        begin = time.perf_counter()
        reason = skip_reason(item, settings)
        if reason is not None:
            outcome = Outcome("SKIP", reason)
        else:
            try:
                outcome = item.run(settings)
            except Exception as err:  # noqa: BLE001 (fail soft: the next item still runs)
                outcome = error_outcome(err)
            with contextlib.suppress(Exception):  # a broken device context: the next item reports it
                release_memory(settings.device)
        seconds = time.perf_counter() - begin
        out(summary_line(number, item.name, outcome, seconds))
        for line in outcome.details:
            out(f"    {line}")
        report["items"][str(number)] = {"name": item.name, "status": outcome.status, "facts": outcome.facts,
                                        "details": outcome.details, "data": outcome.data, "seconds": seconds}
        report["total_seconds"] = time.perf_counter() - started
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1, default=str))
    statuses = [entry["status"] for entry in report["items"].values()]
    counts = collections.Counter(statuses)
    out(f"total wall time {report['total_seconds']:.1f} s: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
        f"{counts['SKIP']} SKIP")
    return report


def exit_status(report: dict) -> int:
    """1 when an item FAILed, else 0."""
    return int(any(entry["status"] == "FAIL" for entry in report["items"].values()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", nargs="*", default=[], metavar="N",
                        help="which items: numbers, lists (2,3) or ranges (2-5); default all: "
                             + ", ".join(f"{n} {item.name}" for n, item in ITEMS.items()))
    parser.add_argument("--json", default=None, metavar="PATH", help="write everything measured to PATH")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on whatever device there is: exercises the logic, the numbers mean nothing")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    parser.add_argument("--data", default="auto", choices=("auto", "random"),
                        help="item 6's inputs: real data where present (auto) or random ones of the same shapes")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the data layer's search)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.numbers = parse_items(args.items)
    except ValueError as err:
        parser.error(str(err))
    return args


def run_check(argv: Sequence[str] | None = None, out: Callable[[str], None] | None = None) -> int:
    """Parse the arguments, run the items, and return the exit status (0, or 1 when an item FAILed)."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    settings = Settings(device=device, sizes=SMOKE if args.smoke else FULL, smoke=args.smoke, data=args.data,
                        data_dir=args.data_dir, seed=args.seed)
    kwargs = {} if out is None else {"out": out}
    return exit_status(run_items(args.numbers, settings, json_path=args.json, **kwargs))


def main(argv: list[str] | None = None) -> None:
    status = run_check(argv)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
