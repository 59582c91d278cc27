"""The GPU check script: what runs on a CPU runs here, the rest through fakes; the CUDA paths are marked ``gpu``.

Default run: the script itself without CUDA (every CUDA item says SKIP with a
reason, exit 0) and a failing item that does not stop the next; the logic of
each item on the CPU: pytest's summary, the tolerance per dtype and the
step-by-step comparison (the foreach path standing in for the fused one, and
a broken implementation it must catch), sync counting and its attribution to
marked lines (syncs faked as torch reports them), the replay comparison, the
bandwidth arithmetic and the event clock (fake events), the curvature costs
on a tiny model, the tracking share.  Slow: the whole script on the CPU, and
every item at smoke sizes (the fused kernels through Triton's interpreter).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from experiments.benchmarks import gpu_check, timing
from experiments.benchmarks.fused_step import make_param_set
from experiments.benchmarks.optimizer_step import gpt2_small_shapes
from vradam import VRAdam
from vradam.functional import IMPLEMENTATIONS, vradam_step

REPO_ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()
CPU = torch.device("cpu")
SYNC_WARNING = "called a synchronizing CUDA operation"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cpu_settings(**changes) -> gpu_check.Settings:
    return gpu_check.Settings(device=CPU, sizes=dataclasses.replace(gpu_check.SMOKE, **changes), smoke=True,
                              data="random")


# ------------------------------------------------------------ the script


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_cuda_item_skips_with_a_reason_and_the_script_exits_0(tmp_path):
    lines = []
    report_path = tmp_path / "report.json"
    status = gpu_check.run_check(["--items", "2-7", "--json", str(report_path)], out=lines.append)
    assert status == 0
    assert lines[0].startswith("gpu_check: torch ")
    item_lines = [line for line in lines if line.startswith("item ")]
    assert [line.split(":")[0] for line in item_lines] == [
        f"item {n} {gpu_check.ITEMS[n].name}" for n in range(2, 8)]
    assert all(": SKIP needs CUDA" in line for line in item_lines)
    assert lines[-1].startswith("total wall time") and "0 FAIL, 6 SKIP" in lines[-1]
    report = json.loads(report_path.read_text())
    assert {entry["status"] for entry in report["items"].values()} == {"SKIP"}
    assert "total_seconds" in report


def test_an_item_that_raises_fails_alone_and_the_next_item_runs(monkeypatch):
    def broken(settings):
        raise RuntimeError("the device fell over\nsecond line")

    monkeypatch.setitem(gpu_check.ITEMS, 1, gpu_check.Item("broken", broken, needs_cuda=False))
    monkeypatch.setitem(gpu_check.ITEMS, 2, gpu_check.Item(
        "fine", lambda settings: gpu_check.Outcome("PASS", "all good", ["a detail"]), needs_cuda=False))
    lines = []
    report = gpu_check.run_items([1, 2], cpu_settings(), out=lines.append)
    assert lines[1].startswith("item 1 broken: FAIL RuntimeError: the device fell over (")
    assert any("raise RuntimeError" in line for line in lines if line.startswith("    "))
    assert any(line.startswith("item 2 fine: PASS all good") for line in lines)
    assert "    a detail" in lines
    assert gpu_check.exit_status(report) == 1


def test_main_exits_with_status_1_when_an_item_fails(monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.ITEMS, 1, gpu_check.Item(
        "bad", lambda settings: gpu_check.Outcome("FAIL", "no"), needs_cuda=False))
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--items", "1"])
    assert exit_info.value.code == 1
    assert "item 1 bad: FAIL no" in capsys.readouterr().out


def test_eos_bench_gpu_runs_the_check_and_passes_on_its_exit_status(monkeypatch):
    from typer.testing import CliRunner

    from experiments.cli import app

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the app's callback replaces it
    monkeypatch.setitem(gpu_check.ITEMS, 1, gpu_check.Item(
        "bad", lambda settings: gpu_check.Outcome("FAIL", "no"), needs_cuda=False))
    monkeypatch.setitem(gpu_check.ITEMS, 2, gpu_check.Item(
        "good", lambda settings: gpu_check.Outcome("PASS", "yes"), needs_cuda=False))
    result = CliRunner().invoke(app, ["bench", "gpu", "--items", "2"])
    assert result.exit_code == 0 and "item 2 good: PASS yes" in result.output
    result = CliRunner().invoke(app, ["bench", "gpu", "--items", "1,2"])
    assert result.exit_code == 1 and "item 1 bad: FAIL no" in result.output


def test_items_are_parsed_from_numbers_lists_and_ranges():
    assert gpu_check.parse_items(["7", "1-3", "2,5"]) == [7, 1, 2, 3, 5]
    for bad in (["8"], ["0-2"], ["x"]):
        with pytest.raises(ValueError, match="allowed"):
            gpu_check.parse_items(bad)


# ------------------------------------------------- item 1: pytest's summary


@pytest.mark.parametrize("output, counts", [
    ("..s\n3 passed, 1 skipped, 650 deselected in 12.01s\n", {"passed": 3, "skipped": 1, "deselected": 650}),
    ("=== 1 failed, 2 passed, 1 warning in 3.00s ===", {"failed": 1, "passed": 2, "warnings": 1}),
    ("E   ImportError\n1 error in 0.50s", {"errors": 1}),
    ("no tests ran in 0.01s", {}),
    ("", {}),
])
def test_pytest_summary_line_is_parsed(output, counts):
    assert gpu_check.parse_pytest_summary(output) == counts


def test_pytest_outcome_passes_skips_and_fails():
    skipped = "SKIPPED [4] tests/vradam/test_no_sync.py:85: needs CUDA\n12 skipped, 657 deselected in 6.44s"
    outcome = gpu_check.pytest_outcome(gpu_check.parse_pytest_summary(skipped), 0, skipped)
    assert outcome.status == "SKIP" and "needs CUDA" in outcome.facts and "0 passed" in outcome.facts
    passed = "SKIPPED [1] a.py:3: triton is not installed\n9 passed, 1 skipped in 30.0s"
    outcome = gpu_check.pytest_outcome(gpu_check.parse_pytest_summary(passed), 0, passed)
    assert outcome.status == "PASS" and outcome.facts.startswith("9 passed, 0 failed, 0 errors, 1 skipped")
    failed = "FAILED tests/x.py::test_y - AssertionError\n1 failed, 8 passed in 30.0s"
    outcome = gpu_check.pytest_outcome(gpu_check.parse_pytest_summary(failed), 1, failed)
    assert outcome.status == "FAIL" and outcome.details == ["FAILED tests/x.py::test_y - AssertionError"]
    crashed = "INTERNALERROR> something"
    assert gpu_check.pytest_outcome({}, 3, crashed).status == "FAIL"


# ------------------------------------------------ item 2: fused vs reference


def test_tolerance_per_dtype_is_float32_arithmetic_or_one_unit_in_the_last_place():
    assert gpu_check.STEP_TOLERANCE == {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2.0 ** -7, 1e-6),
                                       torch.float16: (2.0 ** -10, 1e-6)}
    text = gpu_check.tolerance_text()
    assert "fp32 1e-05|x| + 1e-06" in text and "bf16 2^-7|x|" in text and "fp16 2^-10|x|" in text
    # every dtype that is stored is covered, moments included
    assert {d for layout in gpu_check.STORAGE_LAYOUTS for d in layout} <= set(gpu_check.STEP_TOLERANCE)


def test_one_unit_in_the_last_place_passes_and_two_fail():
    expected = torch.tensor([1.0, 3.0], dtype=torch.float64)
    for dtype, ulp_at_one in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        one_off = expected.to(dtype) + torch.tensor([ulp_at_one, 0.0], dtype=dtype)
        diff, ratio = gpu_check.difference_and_ratio(one_off, expected)
        assert float(diff) == ulp_at_one and float(ratio) <= 1.0
        two_off = expected.to(dtype) + torch.tensor([2 * ulp_at_one, 0.0], dtype=dtype)
        assert float(gpu_check.difference_and_ratio(two_off, expected)[1]) > 1.0
    # the slack for rounded moments widens the bound elementwise
    far = torch.tensor([1.1, 3.0])
    assert float(gpu_check.difference_and_ratio(far, expected)[1]) > 1
    slack = torch.tensor([0.2, 0.0], dtype=torch.float64)
    assert float(gpu_check.difference_and_ratio(far, expected, slack=slack)[1]) < 1


def test_comparison_groups_have_the_fused_layout_and_two_groups():
    groups = gpu_check.comparison_groups(CPU, torch.bfloat16, torch.float32, scale=0.05, seed=0)
    assert len(groups) == 2 and groups[1].maximize and not groups[0].maximize
    transposed = groups[0].params[2]
    assert not transposed.is_contiguous()
    for g in groups:
        for p, grad, v, m, step in zip(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps):
            assert p.dtype == grad.dtype == torch.bfloat16 and v.dtype == m.dtype == torch.float32
            assert p.stride() == grad.stride() == v.stride() == m.stride()
            assert step.dtype == torch.float32 and step.device == p.device


def test_foreach_matches_the_reference_step_by_step_on_the_cpu():
    settings = cpu_settings()
    outcome = gpu_check.fused_against_reference(settings, impl="foreach",
                                                layouts=((torch.float32, torch.float32),))
    assert outcome.status == "PASS", outcome.details
    assert "4 configurations" in outcome.facts and "4 within tolerance" in outcome.facts
    rows = outcome.data["configurations"]
    assert {(r["gate"], r["norm_scope"]) for r in rows} == {(g, s) for g in ("velocity", "gradient")
                                                            for s in ("global", "group")}
    result = gpu_check.compare_with_reference(CPU, torch.float32, torch.float32, gate="gradient", norm_scope="global",
                                              steps=3, scale=0.3, impl="foreach")
    assert gpu_check.comparison_passes(result) and result["clamped_steps"] > 0  # the clamp is seen, and matched


def _off_by_a_little(groups, **options):
    telemetry = IMPLEMENTATIONS["foreach"](groups, **options)
    groups[0].params[0].add_(1e-3)
    return telemetry


def _counting_twice(groups, **options):
    telemetry = IMPLEMENTATIONS["foreach"](groups, **options)
    groups[-1].steps[-1].add_(1)
    return telemetry


@pytest.mark.parametrize("broken, symptom", [(_off_by_a_little, "ratio_params"),
                                             (_counting_twice, "max_step_difference")])
def test_the_comparison_catches_a_wrong_implementation(monkeypatch, broken, symptom):
    monkeypatch.setitem(IMPLEMENTATIONS, "broken", broken)
    result = gpu_check.compare_with_reference(CPU, torch.float32, torch.float32, gate="velocity",
                                              norm_scope="global", steps=2, scale=0.05, impl="broken")
    assert not gpu_check.comparison_passes(result)
    assert result[symptom] > (1.0 if symptom.startswith("ratio") else 0.0)


def test_without_the_kernels_item_2_says_why():
    from vradam import fused_triton

    if fused_triton.is_interpreted():
        pytest.skip("this process runs Triton's interpreter")
    outcome = gpu_check.fused_against_reference(cpu_settings())
    assert outcome.status == "SKIP" and ("TRITON_INTERPRET" in outcome.facts or "Triton" in outcome.facts)


# ------------------------------------------------------------ item 3: syncs


# A fake sync is ``warnings.warn(SYNC_WARNING)`` written where the sync happens: torch's warning comes from C,
# so the innermost Python frame is the line that called the syncing operation.


def syncs_marked_and_not() -> None:
    warnings.warn(SYNC_WARNING, UserWarning)  # sync: a deliberate one (this comment marks it)
    # sync: the comment above a statement marks it too
    warnings.warn(SYNC_WARNING, UserWarning)
    warnings.warn(SYNC_WARNING, UserWarning)
    warnings.warn("an unrelated warning", UserWarning)


MARKED_LINE = syncs_marked_and_not.__code__.co_firstlineno + 1


@pytest.fixture
def fake_modes():
    """Stands in for torch.cuda.set_sync_debug_mode on a machine without CUDA; lists the modes set."""
    return []


def test_recorded_syncs_counts_each_sync_at_its_line_and_knows_the_marked_ones(fake_modes):
    with pytest.warns(UserWarning, match="unrelated"), gpu_check.recorded_syncs(set_mode=fake_modes.append) as sites:
        syncs_marked_and_not()
    assert fake_modes == ["warn", "default"]
    assert sites == [gpu_check.SyncSite(THIS_FILE, MARKED_LINE, True),
                     gpu_check.SyncSite(THIS_FILE, MARKED_LINE + 2, True),
                     gpu_check.SyncSite(THIS_FILE, MARKED_LINE + 3, False)]
    with gpu_check.recorded_syncs(set_mode=fake_modes.append) as none:
        torch.ones(3).sum()
    assert none == []


def test_the_solvers_convergence_test_is_marked_and_its_result_copy_is_not():
    source = (REPO_ROOT / "eos_toolkit" / "solvers.py").read_text().splitlines()
    test_line = next(i for i, text in enumerate(source, 1) if "coefficients[:, :m].cpu()" in text)
    result_line = next(i for i, text in enumerate(source, 1) if "eigenvalues=as_tensor(theta)" in text)
    assert gpu_check.is_marked_deliberate("eos_toolkit/solvers.py", test_line)
    assert not gpu_check.is_marked_deliberate("eos_toolkit/solvers.py", result_line)


def test_a_sync_is_placed_at_the_innermost_project_frame():
    inside = traceback.FrameSummary(str(REPO_ROOT / "eos_toolkit" / "hvp.py"), 10, "f")
    installed = traceback.FrameSummary(str(REPO_ROOT / ".venv" / "site-packages" / "torch" / "x.py"), 5, "g")
    elsewhere = traceback.FrameSummary("/usr/lib/python3/warnings.py", 1, "h")
    assert gpu_check.sync_site([inside, installed, elsewhere]).path == "eos_toolkit/hvp.py"
    assert gpu_check.sync_site([installed, elsewhere]) is gpu_check.OUTSIDE


def test_a_marked_statement_spans_its_lines_and_a_compound_header():
    source = "def f(x):\n    if bool(x.any()):  # sync: once\n        return 1\n    return g(\n        x)\n"
    assert gpu_check.lines_that_mark(source, 2) == ["    if bool(x.any()):  # sync: once"]
    assert gpu_check.lines_that_mark(source, 3) == ["        return 1"]
    assert gpu_check.lines_that_mark(source, 5) == ["    return g(", "        x)"]


class FakeSyncOptimizer:
    """Syncs ``per_step`` times a step; under mode "error" a sync raises, as torch's does."""

    def __init__(self, modes: list, per_step: int):
        self.modes, self.per_step = modes, per_step

    def step(self):
        for _ in range(self.per_step):
            if self.modes and self.modes[-1] == "error":
                raise RuntimeError(SYNC_WARNING)
            warnings.warn(SYNC_WARNING, UserWarning)


@pytest.mark.filterwarnings(f"ignore:{SYNC_WARNING}")  # the uncounted first step's
def test_optimizer_step_syncs_counts_steps_and_tries_error_mode(monkeypatch, fake_modes):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake_modes.append)
    shapes = [(3, 4), (4,), (2, 3)]
    counts, error = gpu_check.optimizer_step_syncs(lambda groups: VRAdam(groups, foreach=True), shapes, CPU, 2)
    assert sum(counts.values()) == 0 and error is None
    counts, error = gpu_check.optimizer_step_syncs(lambda groups: FakeSyncOptimizer(fake_modes, 2), shapes, CPU, 3)
    assert sum(counts.values()) == 6 and error == SYNC_WARNING
    assert fake_modes[-4:] == ["warn", "default", "error", "default"]


class SyncingOperator:
    """A dense operator whose every product syncs once (unmarked), to see the loop's syncs grow."""

    def __init__(self, matrix):
        from eos_toolkit.operators import MatrixOperator

        self.inner = MatrixOperator(matrix)
        self.dim, self.dtype, self.device, self.n_matvecs = matrix.shape[0], matrix.dtype, matrix.device, 0

    def matvec(self, v):
        warnings.warn(SYNC_WARNING, UserWarning)
        return self.inner.matvec(v)

    def matmat(self, V):
        return self.inner.matmat(V)

    def agree(self, flag):
        return flag


@pytest.mark.filterwarnings(f"ignore:{SYNC_WARNING}")  # the uncounted first solve's
def test_lanczos_syncs_that_grow_with_the_products_are_told_from_those_once_per_solve(fake_modes, monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake_modes.append)
    matrix = torch.diag(torch.linspace(1.0, 2.0, 40, dtype=torch.float64))
    short, long = gpu_check.lanczos_sync_counts(SyncingOperator(matrix), (4, 8))
    once, growing = gpu_check.split_by_growth(short, long)
    product_line = SyncingOperator.matvec.__code__.co_firstlineno + 1
    assert growing == {gpu_check.SyncSite(THIS_FILE, product_line, False): (4, 8)}
    assert once == {}  # on the CPU the solver reads its coefficients in place: nothing else syncs


@pytest.mark.slow
def test_the_sync_report_runs_end_to_end_with_the_debug_mode_faked(monkeypatch, fake_modes):
    """On the CPU nothing syncs, so every count is 0; what is checked is that each part runs and reports."""
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake_modes.append)
    details, data, problems = gpu_check.vradam_step_syncs(CPU, 1, seed=0)
    assert problems == [] and {"foreach", "foreach capturable"} <= set(data)
    assert all(entry["syncs"] == 0 and entry["error_mode"] is None for entry in data.values())
    assert any(line.startswith("VRAdam foreach capturable: 0 syncs in 1 steps") for line in details)
    details, data, problems = gpu_check.lanczos_loop_syncs(CPU, (2, 4), seed=0, n_examples=8)
    assert problems == [] and data["products"] == [2, 4] and data["loop_unmarked"] == {}
    assert details[0].startswith("Lanczos on the MLP's Hessian (random inputs, 199,210 parameters)")


def test_without_cuda_item_3_says_why():
    outcome = gpu_check.sync_counts(cpu_settings())
    assert outcome.status == "SKIP" and "CUDA" in outcome.facts


# ---------------------------------------------------------- item 4: replay


def _foreach_step(groups):
    return vradam_step(groups, **gpu_check.REPLAY_OPTIONS, impl="foreach")


def test_replayed_and_eager_states_are_compared_after_shared_new_gradients():
    param_set = make_param_set(gpt2_small_shapes(0.01), CPU)
    a, b = param_set.groups(), param_set.groups()
    grads_before = [g.clone() for g in param_set.grads]
    result = gpu_check.replay_against_eager(lambda: _foreach_step(a), a, lambda: _foreach_step(b), b,
                                            param_set.grads, 3)
    assert result["bitwise_equal"] and gpu_check.replay_passes(result)
    assert torch.allclose(param_set.grads[0], grads_before[0] * (-1.01) ** 3)
    skipped = {"round": 0}

    def replay_missing_a_step():
        skipped["round"] += 1
        return _foreach_step(a) if skipped["round"] != 2 else telemetry_a

    telemetry_a = _foreach_step(a)
    _foreach_step(b)
    result = gpu_check.replay_against_eager(replay_missing_a_step, a, lambda: _foreach_step(b), b, param_set.grads, 3)
    assert not result["bitwise_equal"] and not gpu_check.replay_passes(result)
    assert result["max_step_difference"] == 1.0


def test_without_cuda_item_4_says_why():
    assert gpu_check.graph_replay(cpu_settings()).status == "SKIP"


# ------------------------------------------------------ item 5: step timing


def test_resnet50_shapes_scale_with_width():
    shapes = gpu_check.resnet50_shapes(0.5)
    assert len(shapes) == 161 and shapes[0] == (32, 3, 7, 7) and shapes[-2] == (1000, 1024)


def test_bandwidth_is_bytes_moved_over_time_against_the_copy():
    medians = {"adamw_fused": 1e-3, "adamw_foreach": 2e-3, "vradam_fused": 1.2e-3}
    rows = gpu_check.bandwidth_rows(medians, {"adamw_fused": 28, "vradam_fused": 36}, 100_000_000,
                                    copy_seconds=0.5e-3, copy_bytes=512 << 20)
    by_name = {r["name"]: r for r in rows}
    copy_rate = 2 * (512 << 20) / 0.5e-3
    assert by_name["adamw_fused"]["gb_per_s"] == pytest.approx(28 * 1e8 / 1e-3 / 1e9)
    assert by_name["vradam_fused"]["per_adamw_fused"] == pytest.approx(1.2)
    assert by_name["vradam_fused"]["per_adamw_foreach"] == pytest.approx(0.6)
    assert by_name["vradam_fused"]["percent_of_copy"] == pytest.approx(100 * 36e8 / 1.2e-3 / copy_rate)
    lines = gpu_check.format_bandwidth_rows(gpu_check.bandwidth_rows({"x": 1.0}, {"x": 28}, 10, 1.0, 10))
    assert lines[1].split()[2:4] == ["-", "-"]  # no AdamW measured: no ratio


def test_contenders_that_cannot_run_here_are_named_with_the_reason():
    param_set = gpu_check.device_param_set([(4, 3), (3,)], CPU)
    contenders, missing = gpu_check.step_contenders(param_set, CPU)
    assert {"adamw_foreach", "vradam_foreach"} <= set(contenders)
    assert contenders["vradam_foreach"][1] == 36 and contenders["adamw_foreach"][1] == 28
    from vradam import fused_triton

    if not fused_triton.is_interpreted():
        assert "vradam_fused" in missing and "CUDA" in missing["vradam_fused"]


class FakeEvent:
    """A CUDA event's timing interface on a fake clock (milliseconds)."""

    clock: ClassVar[list[float]] = [0.0]

    def __init__(self):
        self.at = None

    def record(self):
        self.at = FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_event_stopwatch_reads_the_time_between_its_events():
    with timing.EventStopwatch(CPU, event_factory=FakeEvent) as watch:
        FakeEvent.clock[0] += 2.5
    assert watch.seconds == 2.5e-3
    medians = timing.interleaved_medians({"a": lambda: FakeEvent.clock.__setitem__(0, FakeEvent.clock[0] + 4)},
                                         CPU, repeats=3, warmup=1, clock="events")
    assert medians["a"] >= 0  # on the CPU "events" is the wall clock
    with pytest.raises(ValueError, match="allowed: wall, events"):
        timing.interleaved_medians({}, CPU, repeats=1, clock="sundial")


# ------------------------------------------------------- item 6: curvature


def test_random_inputs_are_labelled_as_random():
    images, targets, label = gpu_check.image_data(cpu_settings(n_examples=10))
    assert images.shape == (10, 1, 8, 8) and targets.shape == (10, 10) and label.startswith("RANDOM images")
    model, loss_fn, batches, label = gpu_check.language_model_setup(cpu_settings())
    (x, y), = batches
    assert x.shape == y.shape == (4, 8) and label.startswith("RANDOM tokens")
    assert torch.isfinite(loss_fn(model(x), y))


def test_curvature_costs_on_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    batches = [(x, y)]
    ratios = gpu_check.hvp_gradient_ratios(model, torch.nn.functional.mse_loss, batches, CPU, repeats=1)
    assert ratios["gradient_seconds"] > 0 and ratios["kernel_fallback"] == []
    costs = gpu_check.eigen_costs(model, torch.nn.functional.mse_loss, batches, cpu_settings(eigsh_restarts=30))
    for key in ("cold", "warm"):
        assert costs[key]["error"] <= gpu_check.REL_TARGET and costs[key]["products"] >= 1
    assert costs["eigsh_cold"]["converged"] and costs["eigsh_cold"]["error"] < 1e-4
    assert costs["reference_after_step"] != costs["reference"]  # the GD step moved the model
    line = gpu_check.cost_line("cold", costs["cold"], costs["eigsh_cold"])
    assert line.startswith("  cold: Lanczos ") and "eigsh(tol=0)" in line


# ----------------------------------------------------- item 7: tracked run


def test_tracking_share_adds_the_timed_tracking_work():
    rows = [("hessian_seconds", 2.0), ("precond_seconds", float("nan")), ("density_seconds", 1.0),
            ("hessian_seconds", 1.0), ("examples_per_second", 5e4)]
    assert gpu_check.tracking_share(rows, 8.0) == {"hessian": 3.0, "precond": 0.0, "density": 1.0,
                                                   "tracking": 4.0, "share": 0.5}
    assert gpu_check.last_value([("sharpness", 1.0), ("x", 2.0), ("sharpness", 3.0)], "sharpness") == 3.0


# ------------------------------------------------------------------- slow


def _run_script(args: list[str], env_changes: dict[str, str] | None = None, timeout: int = 900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.update(env_changes or {})
    return subprocess.run([sys.executable, "-m", "experiments.benchmarks.gpu_check", *args], check=False,
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_the_whole_script_runs_on_the_cpu_item_1_included(tmp_path):
    proc = _run_script(["--json", str(tmp_path / "report.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    item_lines = [line for line in proc.stdout.splitlines() if line.startswith("item ")]
    assert len(item_lines) == 7
    assert item_lines[0].startswith("item 1 gpu tests: SKIP 0 passed, 0 failed, 0 errors, ")
    assert all(": SKIP needs CUDA" in line for line in item_lines[1:])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["items"]["1"]["data"]["counts"]["skipped"] >= 1


@pytest.mark.slow
def test_every_item_runs_at_smoke_sizes_on_the_cpu_with_the_kernels_interpreted(tmp_path):
    proc = _run_script(["--smoke", "--items", "2-7", "--data", "random", "--device", "cpu",
                        "--json", str(tmp_path / "report.json")], {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {number: entry["status"] for number, entry in report["items"].items()}
    assert statuses["3"] == statuses["4"] == "SKIP"  # sync debug mode and graphs need CUDA
    assert statuses["5"] == statuses["6"] == "PASS"
    assert statuses["7"] in ("PASS", "SKIP")  # SKIP where the demo's data is not on this machine
    from vradam import fused_triton

    if fused_triton.is_available():
        assert statuses["2"] == "PASS"
        assert "vradam_fused" in {row["name"] for row in report["items"]["5"]["data"]["gpt2"]["rows"]}


# -------------------------------------------------------------------- gpu


@pytest.mark.gpu
@needs_cuda
def test_the_sync_counter_sees_a_real_cuda_sync_and_no_other():
    x = torch.ones(4, device="cuda")
    here = sys._getframe().f_lineno
    with gpu_check.recorded_syncs() as sites:
        x.sum().item()  # two lines below ``here``
    assert sites and all(site == gpu_check.SyncSite(THIS_FILE, here + 2, False) for site in sites)
    with gpu_check.recorded_syncs() as none:
        (x * 2).sum()
    assert none == []


@pytest.mark.gpu
@needs_cuda
def test_the_event_clock_times_cuda_work():
    a = torch.randn(1024, 1024, device="cuda")
    medians = timing.interleaved_medians({"mm": lambda: a @ a}, "cuda", repeats=3, per_batch=2, clock="events")
    assert 0 < medians["mm"] < 1


@pytest.mark.gpu
@needs_cuda
def test_the_cuda_items_pass_at_smoke_sizes(tmp_path):
    """Items 2-5 (fused comparison, syncs, graph replay, event timing) on tiny sizes: a dry run of the CUDA paths."""
    proc = _run_script(["--smoke", "--items", "2-5", "--json", str(tmp_path / "r.json")], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = {n: e["status"] for n, e in json.loads((tmp_path / "r.json").read_text())["items"].items()}
    assert statuses["3"] == statuses["5"] == "PASS"
    from vradam import fused_triton

    if fused_triton.is_available():
        assert statuses["2"] == statuses["4"] == "PASS"
