"""Data-parallel training on two gloo ranks against one process, and a killed two-rank run resumed.

One spawn of two ranks runs every scenario (starting the ranks costs a few
seconds: each imports torch); the tests compare the records it leaves with
runs made in this process.

Tolerance: rank r's gradient is the sum over its pieces, and DDP averages the
ranks' gradients (each scaled by the world size), so the full-batch gradient
is summed in another order than in one process: a few float64 roundings
(~1e-16 relative) a step, which ten steps of gradient descent carry along but
barely amplify. The records are compared to rtol 1e-9 (observed: 1e-13
to 6e-13); the same comparison of two runs that differ in one example's weight
fails by far more. A killed and resumed two-rank run, against an
uninterrupted two-rank run, is compared exactly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from eos_toolkit.metrics import is_timing_metric
from eos_toolkit.record import read_run
from experiments.config import RunConfig
from experiments.train import resume, train
from tests.spawn import needs_gloo, spawn_ranks

pytestmark = needs_gloo

TINY = dict(dataset="fashion-mnist", model_options={"hidden": [12]}, device="cpu", dtype="float64",
            hvp_method="forward_over_reverse", track_every=5)
SCENARIOS = {
    # 100 examples in chunks of 30: pieces of 15 / 15, and 5 / 5 of the last chunk (the uneven pieces,
    # 11 / 10 and 5 / 4, are the next two scenarios')
    "fullbatch": dict(task="eos-fullbatch", n_train=100, chunk_size=30, optimizer="gd", lr=0.2, steps=10),
    # minibatches of 21 drawn from (seed, step): pieces of 11 and 10
    "minibatch": dict(task="image-classification", n_train=120, batch_size=21, track_n=40, chunk_size=16,
                      optimizer="vradam", lr=0.01, beta3=3.0, steps=10, model="mlp-tanh", augment=False),
    # on-policy trajectories sampled from (seed, step) on every rank, 9 per step; detailed balance leaves
    # log Z without a gradient (the data-parallel wrapper must allow it)
    "gflownet": dict(task="gflownet", ndim=2, height=4, objective="db", batch_size=9, track_n=8, eval_n=16,
                     optimizer="adam", lr=1e-3, steps=6, track_every=3),
}
BATCHNORM = dict(task="eos-fullbatch", n_train=100, chunk_size=30, optimizer="gd", lr=0.1, steps=1,
                 model="cnn-small", model_options={"width": 4, "batchnorm": True}, track_every=1)


def config(data_dir, name: str) -> RunConfig:
    scenario = BATCHNORM if name == "batchnorm" else SCENARIOS[name]
    return RunConfig(**{**TINY, **scenario, "data_dir": str(data_dir)})



class Kill(BaseException):
    pass


def on_two_ranks(rank: int, world: int, data_dir, out) -> None:
    for name in SCENARIOS:
        train(config(data_dir, name), out / f"ddp-{name}")

    def kill_at_7(step, total):
        if step == 7:  # after the checkpoint at 5
            raise Kill()

    for name in ("killed", "left-killed"):
        try:
            train(config(data_dir, "fullbatch"), out / name, on_step=kill_at_7)
        except Kill:
            pass
    resume(out / "killed")
    # A batch of 1 cannot be split over 2 ranks: both ranks stop with the reason (none waits for the other).
    tiny_batch = dataclasses.replace(config(data_dir, "minibatch"), batch_size=1)
    try:
        train(tiny_batch, out / "tiny-batch")
    except ValueError as err:
        (out / f"tiny-batch-rank{rank}.txt").write_text(str(err))
    # BatchNorm measured with batch statistics: the tracking chunks go whole to the ranks, so the
    # sharpness at step 0 (same parameters everywhere) is the single process's.
    train(config(data_dir, "batchnorm"), out / "ddp-batchnorm")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import numpy as np

    from tests.experiments.conftest import _class_patterns
    from tests.experiments.idx import IDX_NAMES, idx_bytes
    import gzip

    root = tmp_path_factory.mktemp("ddp")
    data = root / "data" / "fashion-mnist"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 50)):
        for stem, array in zip(IDX_NAMES[split], _class_patterns(n, 10, rng)):
            (data / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    spawn_ranks(on_two_ranks, root, root / "data", root)
    for name in [*SCENARIOS, "batchnorm"]:
        train(config(root / "data", name), root / f"single-{name}")
    return root


def values(run):
    m = run.metrics[~run.metrics.metric.map(is_timing_metric)].sort_values(["step", "metric"])
    return m.reset_index(drop=True)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_two_rank_run_records_what_one_process_records(records, name):
    ddp, single = read_run(records / f"ddp-{name}"), read_run(records / f"single-{name}")
    a, b = values(ddp), values(single)
    assert (a[["step", "metric"]].values == b[["step", "metric"]].values).all()
    assert a["value"].values == pytest.approx(b["value"].values, rel=1e-9, abs=1e-12)
    assert {"train_loss", "sharpness", "threshold" if name == "fullbatch" else "precond_threshold"} <= set(a.metric)
    if name == "gflownet":
        assert {"l1_exact", "l1_empirical", "log_z_error"} <= set(a.metric)
    assert [e["event"] for e in ddp.events] == ["started", "finished"]  # rank 0 alone writes
    dist = ddp.environment["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and [r["device"] for r in dist["ranks"]] == ["cpu"] * 2


def test_the_comparison_can_fail(records):
    """Guard for the test above: two single-process runs one step apart do not pass it."""
    a = values(read_run(records / "single-fullbatch"))
    b = a.copy()
    b.loc[b.metric == "train_loss", "value"] *= 1 + 1e-7
    assert b["value"].values != pytest.approx(a["value"].values, rel=1e-9, abs=1e-12)


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_one(records):
    whole, resumed = read_run(records / "ddp-fullbatch"), read_run(records / "killed")
    assert [e["event"] for e in resumed.events] == ["started", "resumed", "finished"]
    assert resumed.events[1]["step"] == 5
    a, b = values(whole), values(resumed)
    assert a.equals(b)


def test_resume_refuses_another_number_of_processes(records):
    killed = records / "left-killed"
    assert json.loads((killed / "environment.json").read_text())["distributed"]["world_size"] == 2
    with pytest.raises(ValueError, match=r"ran on 2 process\(es\); resume it with the same number "
                                         r"\(eos resume --nproc 2\), not 1"):
        resume(killed)
    assert read_run(killed).status == "incomplete"  # refused, untouched


def test_observed_gap_between_two_ranks_and_one_process(records, capsys):
    """Not a check: prints the largest relative difference, the figure the module docstring quotes."""
    for name in SCENARIOS:
        a, b = (values(read_run(records / f"{kind}-{name}"))["value"].values for kind in ("ddp", "single"))
        gap = (abs(a - b) / abs(b).clip(1e-12)).max()
        print(f"{name}: largest relative difference {gap:.2e}")
        assert gap <= 1e-9


def test_a_batch_too_small_to_split_stops_every_rank_with_the_reason(records):
    for rank in range(2):
        message = (records / f"tiny-batch-rank{rank}.txt").read_text()
        assert "has 1 examples, fewer than the 2 ranks" in message
    assert read_run(records / "tiny-batch").events[-1]["event"] == "failed"


def test_batchnorm_tracking_chunks_stay_whole(records):
    """Batch statistics are a chunk's: split by example, the ranks would measure another Hessian."""
    ddp, single = (values(read_run(records / f"{kind}-batchnorm")) for kind in ("ddp", "single"))
    at_0 = [v[v.step == 0].set_index("metric")["value"] for v in (ddp, single)]
    assert at_0[0]["sharpness"] == pytest.approx(at_0[1]["sharpness"], rel=1e-10)
    assert at_0[0]["track_loss"] == pytest.approx(at_0[1]["track_loss"], rel=1e-12)


def test_checkpoints_keep_every_ranks_dropout_stream(records):
    import torch

    state = torch.load(records / "left-killed" / "checkpoints" / "last.pt", weights_only=True)
    streams = [r["rng_torch"] for r in state["rng_ranks"]]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])  # seeded from (seed, rank)
