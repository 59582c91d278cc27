"""The training loop: records, tracking against independent answers, resume, divergence."""

import math

import pytest
import torch
from torch.func import functional_call, hessian

from eos_toolkit.metrics import is_timing_metric
from eos_toolkit.record import read_run
from experiments.config import RunConfig
from experiments.resolve import resolve
from experiments.tasks import build_task
from experiments.train import resume, train

TINY = dict(task="eos-fullbatch", dataset="fashion-mnist", n_train=100, model_options={"hidden": [12]},
            track_every=5, chunk_size=64, device="cpu")


def tiny(data_dir, **overrides) -> RunConfig:
    return RunConfig(**{**TINY, "data_dir": str(data_dir), **overrides})


def metric(run, name):
    m = run.metrics
    return m[m.metric == name].set_index("step")["value"]


def test_gd_record_and_sharpness_equal_dense_hessian(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="gd", lr=0.5, steps=12, dtype="float64", track_k=2, lanczos_tol=1e-10,
               lanczos_max_iter=200)
    result = train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert result.status == run.status == "finished"
    assert [e["event"] for e in run.events] == ["started", "hvp_method", "finished"]
    chosen = run.events[1]  # hvp_method "auto": timed on the first measurement, recorded once
    assert chosen["step"] == 0 and chosen["method"] in chosen["timings"]
    assert chosen["timings"][chosen["method"]]["relative_error"] <= 1e-5
    assert metric(run, "train_loss").index.tolist() == list(range(12))
    assert metric(run, "sharpness").index.tolist() == [0, 5, 10, 12]
    assert (metric(run, "threshold") == 2 / 0.5).all()
    assert run.environment["data"]["dataset"] == "fashion-mnist"
    assert len(run.environment["data"]["checksum"]) == 64

    # Independent answer: the dense Hessian of the full-batch loss at the initial parameters.
    task = build_task(resolve(cfg), torch.device("cpu"), torch.float64)
    model, (x, y) = task.model, task.train
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        return task.loss_fn(functional_call(model, params, (x,)), y)

    eigs = torch.linalg.eigvalsh(hessian(loss_of)(flat0))
    assert metric(run, "hessian_eig_1")[0] == pytest.approx(eigs[-1].item(), rel=1e-8)
    assert metric(run, "hessian_eig_2")[0] == pytest.approx(eigs[-2].item(), rel=1e-8)
    assert metric(run, "train_loss")[0] == pytest.approx(loss_of(flat0).item(), rel=1e-12)
    # GD moves by lr * gradient: the first update's norm is lr |grad L(theta_0)|.
    grad0 = torch.func.grad(loss_of)(flat0)
    assert metric(run, "update_norm")[0] == pytest.approx(0.5 * grad0.norm().item(), rel=1e-10)


def test_vradam_records_gate_and_preconditioned_sharpness(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="vradam", lr=0.01, beta3=50.0, alpha1=3.0, steps=10)
    train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    eta, s, clamped, lr = (metric(run, n) for n in ("eta", "vr_sq_norm", "vr_clamped", "lr"))
    # The gate, recomputed from the recorded s_t: eta_t = lr / (1 + min(beta3 s_t, alpha1)).
    expected = [0.01 / (1 + min(50.0 * v, 3.0)) for v in s]
    assert eta.tolist() == pytest.approx(expected, rel=1e-5)
    assert clamped.tolist() == [float(50.0 * v >= 3.0) for v in s]
    assert (lr == 0.01).all()
    assert metric(run, "precond_threshold").tolist() == pytest.approx([38 / 0.01] * 3)
    # The line at the effective rate: 38 / eta_t with the eta of the step before the measurement.
    assert metric(run, "precond_threshold_eta")[5] == pytest.approx(38 / eta[4], rel=1e-5)
    assert metric(run, "precond_sharpness").notna().all()
    assert metric(run, "precond_sharpness").index.tolist() == [5, 10]  # Adam state exists from step 1


def test_thresholds_use_the_rates_of_the_step_that_produced_the_parameters(tiny_data_dir, tmp_path):
    """The warmup changes the rate at every step: a measurement at t is compared with step t - 1's lr and eta_t."""
    lr = 0.01
    cfg = tiny(tiny_data_dir, optimizer="vradam", lr=lr, beta3=50.0, alpha1=3.0, steps=8, warmup_steps=20,
               track_every=2)
    train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    lrs, eta = metric(run, "lr"), metric(run, "eta")
    assert lrs[0] == pytest.approx(lr / 20) and (lrs.diff().dropna() > 0).all()  # a new rate every step
    line, line_eta = metric(run, "precond_threshold"), metric(run, "precond_threshold_eta")
    assert line[0] == pytest.approx(38 / lrs[0])  # before any step: the rate step 0 will use
    for t in (2, 4, 6):
        assert line[t] == pytest.approx(38 / lrs[t - 1]) and line[t] != pytest.approx(38 / lrs[t])
        assert line_eta[t] == pytest.approx(38 / eta[t - 1], rel=1e-6)
    assert line[8] == pytest.approx(38 / lrs[7])
    assert line_eta.index.tolist() == [2, 4, 6, 8]  # no gate exists before the first step
    assert "precond_sharpness" not in set(run.metrics[run.metrics.step == 0].metric)


def test_rmsprop_line_is_its_own_threshold(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="rmsprop", lr=1e-3, steps=5)
    train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert metric(run, "precond_threshold").tolist() == pytest.approx([2 / 1e-3] * 2)  # no momentum: 2/lr
    assert metric(run, "precond_sharpness").notna().all()


def test_missing_optimizer_state_gives_nan_and_one_warning(tiny_data_dir, tmp_path):
    """A tracked parameter without optimizer state: NaN preconditioned metrics and one warning event, no skip."""
    from eos_toolkit import record
    from experiments.train import build_trainer

    cfg = resolve(tiny(tiny_data_dir, optimizer="adam", lr=0.01, steps=12, track_every=2))
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.writer = record.RunWriter.create(tmp_path / "run", cfg.to_dict(), {})
    trainer.writer.event("started", step=0)
    first = trainer.params[0]

    def forget_state(step, total):
        if step in (4, 8):  # called with the step count after a step: the state is gone at tracking steps 4 and 8
            trainer.optimizer.state.pop(first)

    trainer.run(on_step=forget_state)
    run = read_run(tmp_path / "run")
    sharp = metric(run, "precond_sharpness")
    assert sharp.index.tolist() == [2, 4, 6, 8, 10, 12]
    assert math.isnan(sharp[4]) and math.isnan(sharp[8])
    assert sharp.drop([4, 8]).notna().all()
    warnings = [e for e in run.events if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["step"] == 4 and "NaN" in warnings[0]["message"]


class SimulatedKill(BaseException):
    """Stands in for SIGKILL: the loop must not catch it or write anything on its way out."""


def train_killed_at(cfg, run_dir, at: int) -> None:
    """Start ``cfg`` in ``run_dir`` and kill it right after step ``at``."""
    def kill(step, total):
        if step == at:
            raise SimulatedKill()

    with pytest.raises(SimulatedKill):
        train(cfg, run_dir, on_step=kill)


@pytest.mark.parametrize("overrides", [
    dict(optimizer="vradam", lr=0.01, beta3=5.0, steps=17, track_k=2),
    dict(task="image-classification", optimizer="momentum", lr=0.05, steps=17, batch_size=32,
         model="cnn-small", model_options={"width": 4, "batchnorm": True}, track_n=64,
         schedule="CosineAnnealingLR", warmup_steps=3),
])
def test_kill_and_resume_equals_uninterrupted(tiny_data_dir, tmp_path, overrides, monkeypatch):
    import eos_toolkit.method_choice as method_choice
    import eos_toolkit.tracker as tracker_module

    # hvp_method "auto" times the methods, and two runs may choose differently (their sharpness then
    # agrees to 1e-5, not bitwise); a fixed choice makes both runs choose reuse_graph.
    monkeypatch.setattr(method_choice, "cheapest_method", lambda timings, products: "reuse_graph")
    cfg = tiny(tiny_data_dir, **overrides)
    train(cfg, tmp_path / "whole")

    def kill_at_13(step, total):
        if step == 13:
            raise SimulatedKill()

    with pytest.raises(SimulatedKill):
        train(cfg, tmp_path / "killed", on_step=kill_at_13)
    assert read_run(tmp_path / "killed").status == "incomplete"
    monkeypatch.setattr(tracker_module, "choose_method", lambda *a, **k: pytest.fail("resume chose again"))
    result = resume(tmp_path / "killed")
    assert result.status == "finished"

    whole, resumed = read_run(tmp_path / "whole"), read_run(tmp_path / "killed")
    assert [e["event"] for e in resumed.events] == ["started", "hvp_method", "resumed", "finished"]
    assert resumed.events[1]["method"] == "reuse_graph" and resumed.events[2]["step"] == 10
    a, b = (r.metrics[~r.metrics.metric.map(is_timing_metric)].sort_values(["step", "metric"]).reset_index(drop=True)
            for r in (whole, resumed))
    assert len(a) == len(b) and (a[["step", "metric"]] == b[["step", "metric"]]).all().all()
    assert a["value"].tolist() == b["value"].tolist()  # exact, NaN-free
    with pytest.raises(ValueError, match="already finished"):
        resume(tmp_path / "killed")


def test_resume_refuses_other_data_than_the_run_started_on(tiny_data_dir, tmp_path):
    """'auto' is resolved once and recorded; a resume on changed data files is a clear error."""
    import gzip

    from tests.experiments.idx import IDX_NAMES, idx_bytes

    cfg = tiny(tiny_data_dir, dataset="auto", optimizer="gd", lr=0.1, steps=12)

    def kill_at_7(step, total):
        if step == 7:
            raise SimulatedKill()

    with pytest.raises(SimulatedKill):
        train(cfg, tmp_path / "run", on_step=kill_at_7)
    run = read_run(tmp_path / "run")
    assert run.config["dataset"] == "fashion-mnist" and run.environment["data"]["dataset_requested"] == "auto"
    images = torch.randint(0, 255, (200, 10, 10), dtype=torch.uint8).numpy()
    path = tiny_data_dir / "fashion-mnist" / f"{IDX_NAMES['train'][0]}.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    with pytest.raises(ValueError, match=r"started on checksum '[0-9a-f]{64}' but resuming would use '[0-9a-f]{64}'"):
        resume(tmp_path / "run")


def test_divergence_is_a_result_with_a_complete_record(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="gd", lr=200.0, steps=40, track_every=10)
    result = train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert result.status == run.status == "diverged"
    step = run.events[-1]["step"]
    loss = metric(run, "train_loss")
    assert loss.index.max() == step
    bad = loss[step]
    assert not math.isfinite(bad) or bad > 1e3 * loss[0]
    assert all(math.isfinite(v) and v <= 1e3 * loss[0] for v in loss[loss.index < step])


def test_target_loss_stops_the_run(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="adam", lr=0.01, steps=200, target_loss=0.3)
    result = train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert result.status == "finished" and result.step < 200
    assert "target_reached" in [e["event"] for e in run.events]
    loss = metric(run, "train_loss")
    assert loss.min() <= 0.3 and (loss[loss.index < loss.idxmin()] > 0.3).all()


def test_target_accuracy_stops_the_run_at_the_tracking_step_that_reaches_it(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="adam", lr=0.01, steps=200, target_acc=0.5)
    result = train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    reached = [e for e in run.events if e["event"] == "target_reached"]
    acc = metric(run, "track_acc")
    assert len(reached) == 1 and reached[0]["step"] == result.step < 200
    assert acc[result.step] >= 0.5 and (acc[acc.index < result.step] < 0.5).all()


@pytest.mark.slow
def test_gradient_descent_reaches_the_edge_of_stability_on_real_data(tmp_path):
    """Cohen et al. 2021 on a real subset: sharpness rises to 2/eta and stays within 10% of it."""
    from experiments.data import DatasetNotFoundError, resolve_dataset

    try:
        name = resolve_dataset("fashion-mnist")
    except DatasetNotFoundError:
        pytest.skip("needs Fashion-MNIST: eos data fetch fashion-mnist")
    lr = 0.04
    cfg = RunConfig(task="eos-fullbatch", dataset=name, n_train=1000, optimizer="gd", lr=lr, steps=1000,
                    track_every=20, device="cpu")
    train(cfg, tmp_path / "run")
    ratio = metric(read_run(tmp_path / "run"), "sharpness") / (2 / lr)
    assert ratio[0] < 0.85  # starts below the edge,
    assert ratio[ratio.index <= 300].max() > 1.0  # sharpens up to it within a few hundred steps,
    last = ratio[ratio.index >= 700]
    assert ((last - 1).abs() <= 0.1).all(), last.tolist()  # and hovers at it to the end


def test_spectral_density_is_recorded_with_unit_mass(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="gd", lr=0.5, steps=10, track_density_every=5, dtype="float64",
               density_probes=2, density_steps=30)
    train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert sorted(set(run.density["step"])) == [0, 5, 10]
    for _, curve in run.density.groupby("step"):
        x, d = curve["eigenvalue"].to_numpy(), curve["density"].to_numpy()
        assert (d >= 0).all()
        assert ((d[1:] + d[:-1]) / 2 * (x[1:] - x[:-1])).sum() == pytest.approx(1.0, abs=0.02)
    # The grid spans the spectrum: its top reaches past the measured sharpness.
    assert run.density[run.density.step == 0]["eigenvalue"].max() >= metric(run, "sharpness")[0]


def test_evaluation_leaves_batchnorm_statistics_and_mode_alone():
    from experiments.models import build_model
    from experiments.tasks.images import cross_entropy, evaluate

    model = build_model("cnn-small", (1, 10, 10), 10, batchnorm=True, seed=0).train()
    before = [b.clone() for b in model.buffers()]
    x, y = torch.randn(16, 1, 10, 10), torch.randint(0, 10, (16,))
    batch_loss, _ = evaluate(model, cross_entropy, [(x, y)], train_mode=True)
    # Independent answer: the same forward with batch statistics, by hand.
    with torch.no_grad():
        expected = cross_entropy(torch.func.functional_call(
            model, {**dict(model.named_parameters()), **{n: b.clone() for n, b in model.named_buffers()}}, (x,)), y)
    assert batch_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    evaluate(model, cross_entropy, [(x, y)], train_mode=False)
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


@pytest.mark.parametrize("damage", ["truncated_checkpoint", "metrics_cut", "environment_deleted"])
def test_resume_after_damage_falls_back_and_loses_nothing(tiny_data_dir, tmp_path, damage):
    """A damaged record resumes from the newest usable checkpoint and ends equal to an uninterrupted run.

    (A named product rule: with "auto" the two runs could choose differently and agree to 1e-7, not bitwise.)
    """
    cfg = tiny(tiny_data_dir, optimizer="gd", lr=0.1, steps=17, hvp_method="reuse_graph")
    train(cfg, tmp_path / "whole")

    train_killed_at(cfg, tmp_path / "run", 13)
    run_dir = tmp_path / "run"
    if damage == "truncated_checkpoint":
        last = run_dir / "checkpoints" / "last.pt"
        last.write_bytes(last.read_bytes()[:100])
    elif damage == "metrics_cut":  # rows of steps 6..13 lost (a cut file), the checkpoint at 10 is ahead of them
        lines = (run_dir / "metrics.csv").read_text().splitlines()
        kept = [line for line in lines if line.startswith("step") or int(line.split(",")[0]) <= 5]
        (run_dir / "metrics.csv").write_text("\n".join(kept) + "\n")
    else:
        (run_dir / "environment.json").unlink()
    resume(run_dir)
    resumed_event = [e for e in read_run(run_dir).events if e["event"] == "resumed"][0]
    if damage == "environment_deleted":
        assert resumed_event["checkpoint"] == "last.pt"
        environment = read_run(run_dir).environment
        assert "rewritten_on_resume" in environment and environment["data"]["dataset"] == "fashion-mnist"
    else:
        assert resumed_event["checkpoint"] == "previous.pt" and resumed_event["step"] == 5
        reason = "does not load" if damage == "truncated_checkpoint" else "metrics.csv ends at step 5"
        assert reason in resumed_event["passed_over"][0]
    a, b = (r.metrics[~r.metrics.metric.map(is_timing_metric)].sort_values(["step", "metric"]).reset_index(drop=True)
            for r in (read_run(tmp_path / "whole"), read_run(run_dir)))
    assert a["value"].tolist() == b["value"].tolist()


def test_resume_says_clearly_when_no_checkpoint_is_usable(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, optimizer="gd", lr=0.1, steps=17)

    train_killed_at(cfg, tmp_path / "run", 13)
    for name in ("last.pt", "previous.pt"):
        path = tmp_path / "run" / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot be resumed without losing results: last.pt does not load"):
        resume(tmp_path / "run")
