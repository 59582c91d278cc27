"""The monitor inside Lightning and Hugging Face Trainer, and TensorBoard, with the real packages.

Each framework trains a tiny float64 model for a few steps with the callback;
what the record holds is checked against a dense Hessian of the same loss at
the same weights, the record is plotted, TensorBoard's own reader reads the
scalars back, and a run resumed from the framework's checkpoint measures warm.
"""
from __future__ import annotations

import copy
import glob

import pytest
import torch
from torch import nn
from torch.func import functional_call
from typer.testing import CliRunner

from eos_toolkit import metrics as names
from eos_toolkit.adapters import adapter_for
from eos_toolkit.monitor import EoSMonitor
from eos_toolkit.record import read_run
from tests.eos_toolkit.reference import DT, dense_hessian, regression_data, tanh_mlp
from vradam import VRAdam

mse = nn.functional.mse_loss


def top_eigenvalue(H: torch.Tensor, P: torch.Tensor | None = None) -> float:
    if P is not None:
        s = P.rsqrt()
        H = s[:, None] * H * s[None, :]
    return float(torch.linalg.eigvalsh(H)[-1])


def recorded(run_dir, metric: str, step: int) -> float:
    m = read_run(run_dir).metrics
    return float(m[(m.metric == metric) & (m.step == step)].value.iloc[0])


def scalars(log_dir, tag: str) -> dict[int, float]:
    """TensorBoard's own reader on every event file under ``log_dir``: step -> value of ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def plotted(run_dir, out) -> bool:
    from experiments.cli import app

    result = CliRunner().invoke(app, ["plot", str(run_dir), "--kind", "sharpness", "--out", str(out)])
    return result.exit_code == 0 and (out / "sharpness.png").is_file()


# ---------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def lightning():
    return pytest.importorskip("lightning.pytorch")


def lightning_module(pl, optimizer: str):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return mse(self(x), y)

        def configure_optimizers(self):
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-2)
            return VRAdam(self.parameters(), lr=1e-2, beta3=5.0, weight_decay=0.0)

    return Tiny()


def fit(pl, module, data, root, steps: int, callback, ckpt_path=None):
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    logger = pl.loggers.TensorBoardLogger(root, name="tb")
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=logger, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=root)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("optimizer", ["adam", "vradam"])
def test_lightning_records_dense_sharpness_plots_logs_and_resumes_warm(lightning, tmp_path, optimizer):
    from eos_toolkit.integrations.lightning import EoSCallback

    pl = lightning
    data = regression_data(16, 5, 3)
    options = dict(every=2, out=tmp_path / "run", tol=1e-10, max_iter=100)
    module = lightning_module(pl, optimizer)
    trainer = fit(pl, module, data, tmp_path, 4, EoSCallback([data], mse, **options))
    opt = trainer.optimizers[0]
    H = dense_hessian(module.net, mse, *data)
    P = adapter_for(opt).preconditioner(opt, list(module.parameters()))
    assert recorded(tmp_path / "run", names.SHARPNESS, 4) == pytest.approx(top_eigenvalue(H), rel=1e-8)
    assert recorded(tmp_path / "run", names.PRECOND_SHARPNESS, 4) == pytest.approx(top_eigenvalue(H, P), rel=1e-8)
    assert plotted(tmp_path / "run", tmp_path / "figures")
    logged = scalars(tmp_path / "tb", "eos/sharpness")
    assert sorted(logged) == [0, 2, 4] and logged[4] == pytest.approx(top_eigenvalue(H), rel=1e-6)

    # Resume from Lightning's checkpoint at step 4, two steps more: the first measurement starts warm.
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    resumed_module = lightning_module(pl, optimizer)
    callback = EoSCallback([data], mse, **options)
    trainer = fit(pl, resumed_module, data, tmp_path, 6, callback, ckpt_path=tmp_path / "step4.ckpt")
    warm = recorded(tmp_path / "run", names.matvecs(names.HESSIAN), 6)
    cold = EoSMonitor(resumed_module, trainer.optimizers[0], mse, [data], tol=1e-10, max_iter=100,
                      method=callback.monitor.tracker.hessian.method).start()
    assert warm < cold[names.matvecs(names.HESSIAN)]
    assert recorded(tmp_path / "run", names.SHARPNESS, 6) == pytest.approx(cold[names.SHARPNESS], rel=1e-8)
    run = read_run(tmp_path / "run")
    assert run.status == "finished" and "resumed" in [e["event"] for e in run.events]
    assert sorted(run.metrics[run.metrics.metric == names.SHARPNESS].step) == [0, 2, 4, 6]


def test_lightning_refuses_a_trainer_without_an_optimizer(lightning, tmp_path):
    from eos_toolkit.integrations.lightning import EoSCallback

    pl = lightning

    class NoOptimizer(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp()

        def training_step(self, batch, batch_idx):
            return mse(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return None

    data = regression_data(8, 5, 3)
    with pytest.raises(ValueError, match="needs the trainer's optimizer"):
        fit(pl, NoOptimizer(), data, tmp_path, 2, EoSCallback([data], mse))


# ---------------------------------------------------------------- Hugging Face Trainer

@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


class Sequences(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(transformers):
    """One layer of width 4 (308 parameters): the dense reference Hessian of a wider one would not fit a test."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=8, n_positions=6, n_embd=4, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).to(DT)


def hf_trainer(transformers, model, data, out, steps: int):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=["tensorboard"], save_strategy="steps", save_steps=2,
        logging_steps=100, use_cpu=True, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def model_objective(model, chunks):
    """The example-weighted mean of the model's own loss over the tracking chunks, as a function of a flat vector."""
    names_ = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    total = sum(len(c) for c in chunks)

    def loss_of(flat):
        params = dict(zip(names_, (t.reshape(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]),
                                                                 shapes))))
        return sum(functional_call(model, params, (), {"input_ids": c, "labels": c}).loss * len(c) / total
                   for c in chunks)

    return loss_of, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_hugging_face_trainer_records_dense_sharpness_logs_and_resumes_warm(hf, tmp_path):
    from eos_toolkit.integrations.huggingface import EoSTrainerCallback

    ids = torch.randint(0, 8, (12, 6), generator=torch.Generator().manual_seed(1))
    data = Sequences(ids)
    options = dict(n=12, chunk_size=6, every=2, out=tmp_path / "run", tol=1e-9, max_iter=80,
                   method="double_backward")
    model = tiny_gpt2(hf)
    trainer = hf_trainer(hf, model, data, tmp_path / "out", 2)
    EoSTrainerCallback.attach(trainer, data, **options)
    trainer.train()
    loss_of, flat = model_objective(model, [ids[:6], ids[6:]])
    H = torch.autograd.functional.hessian(loss_of, flat, vectorize=True)
    opt = trainer.optimizer.optimizer
    P = adapter_for(opt).preconditioner(opt, list(model.parameters()))
    assert recorded(tmp_path / "run", names.SHARPNESS, 2) == pytest.approx(top_eigenvalue(H), rel=1e-8)
    assert recorded(tmp_path / "run", names.PRECOND_SHARPNESS, 2) == pytest.approx(top_eigenvalue(H, P), rel=1e-8)
    assert plotted(tmp_path / "run", tmp_path / "figures")
    logged = scalars(tmp_path / "out", "train/eos/sharpness")  # trainer.log puts training scalars under train/
    assert sorted(logged) == [0, 2] and logged[2] == pytest.approx(top_eigenvalue(H), rel=1e-6)

    # Resume from the trainer's checkpoint at step 2, to step 4: the callback's measurement at 4 starts warm.
    resumed_model = tiny_gpt2(hf)
    resumed = hf_trainer(hf, resumed_model, data, tmp_path / "out", 4)
    callback = EoSTrainerCallback.attach(resumed, data, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    warm = recorded(tmp_path / "run", names.matvecs(names.HESSIAN), 4)
    cold = EoSMonitor(callback.monitor.model, resumed.optimizer.optimizer, callback.monitor.loss_fn,
                      callback.monitor.batches, chunk_weights=[6.0, 6.0], tol=1e-9, max_iter=80,
                      method="double_backward").start()
    assert warm < cold[names.matvecs(names.HESSIAN)]
    assert recorded(tmp_path / "run", names.SHARPNESS, 4) == pytest.approx(cold[names.SHARPNESS], rel=1e-8)
    run = read_run(tmp_path / "run")
    assert [e["event"] for e in run.events] == ["started", "finished", "resumed", "finished"]
    assert sorted(run.metrics[run.metrics.metric == names.SHARPNESS].step) == [0, 2, 4]


# ---------------------------------------------------------------- TensorBoard

def test_records_export_to_tensorboard_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    model = tanh_mlp()
    x, y = regression_data(16, 5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = EoSMonitor(model, opt, mse, [(x, y)], every=2, out=tmp_path / "runs" / "gd")
    monitor.start()
    for _ in range(4):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        monitor.step(loss)
    monitor.close()
    from experiments.cli import app

    result = CliRunner().invoke(app, ["export", "tensorboard", str(tmp_path / "runs"), "--out", str(tmp_path / "tb")])
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "tb" / "gd")
    m = read_run(tmp_path / "runs" / "gd").metrics
    for metric in (names.SHARPNESS, names.THRESHOLD, names.TRAIN_LOSS, names.ETA):
        expected = m[m.metric == metric].set_index("step").value.to_dict()
        assert scalars(tmp_path / "tb", f"eos/{metric}") == pytest.approx(expected, rel=1e-6)
    missing = CliRunner().invoke(app, ["export", "tensorboard", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
