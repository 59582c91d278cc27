"""What one tracking step costs in each way of running the monitor, against the same measurement alone.

The same model, data, optimizer state and solve in every row: a tanh MLP on
random inputs (the cost does not depend on the values), Adam, the Hessian and
the preconditioned solve each a fixed number of products (``tol=0``, a pinned
product rule), so every row does the same linear algebra.  Rows:

* ``tracker.measure``: :meth:`eos_toolkit.tracker.SharpnessTracker.measure` alone, the baseline;
* ``plain loop``: :meth:`eos_toolkit.monitor.EoSMonitor.step` at a tracking step (the buffered rows
  written with one sync, the tracking loss, the thresholds, the record);
* ``lightning``: the :class:`~eos_toolkit.integrations.lightning.EoSCallback` hook at a tracking step,
  logging through the trainer's CSV logger;
* ``hugging face``: the :class:`~eos_toolkit.integrations.huggingface.EoSTrainerCallback` hook, logging
  through ``trainer.log``.

Each row is the median over ``--steps`` tracking steps (every step a tracking
step), and its ratio to the baseline's median.  The frameworks' rows need
``pip install 'eos-toolkit[integrations]'`` and are skipped, and said so,
without it.

    python -m experiments.benchmarks.monitor_cost --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eos_toolkit.monitor import EoSMonitor
from eos_toolkit.tracker import SharpnessTracker
from experiments.benchmarks.timing import timed


@dataclass(frozen=True)
class Setting:
    examples: int
    width: int
    products: int
    steps: int
    method: str
    seed: int


def model_and_data(s: Setting):
    torch.manual_seed(s.seed)
    model = nn.Sequential(nn.Linear(64, s.width), nn.Tanh(), nn.Linear(s.width, s.width), nn.Tanh(),
                          nn.Linear(s.width, 10))
    g = torch.Generator().manual_seed(s.seed)
    return model, torch.randn(s.examples, 64, generator=g), torch.randn(s.examples, 10, generator=g)


def solve_options(s: Setting) -> dict:
    return dict(tol=0.0, max_iter=s.products, method=s.method)


def adam_stepped(model, x, y) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    return optimizer


def tracker_row(s: Setting) -> list[float]:
    from eos_toolkit.adapters import adapter_for

    model, x, y = model_and_data(s)
    optimizer = adam_stepped(model, x, y)
    tracker = SharpnessTracker(model, nn.functional.mse_loss, [(x, y)], precondition=True, **solve_options(s))
    P = adapter_for(optimizer).preconditioner(optimizer, tracker.hessian.parameters)
    tracker.measure(P)  # the first measurement: method set-up, workspace sizes
    return [timed(lambda: tracker.measure(P), "cpu")[1] for _ in range(s.steps)]


def plain_loop_row(s: Setting, out: Path) -> list[float]:
    model, x, y = model_and_data(s)
    optimizer = adam_stepped(model, x, y)
    monitor = EoSMonitor(model, optimizer, nn.functional.mse_loss, [(x, y)], every=1, out=out / "plain",
                         **solve_options(s))
    monitor.start()
    seconds = []
    for _ in range(s.steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        seconds.append(timed(lambda: monitor.step(loss), "cpu")[1])
    monitor.close()
    return seconds


def lightning_row(s: Setting, out: Path) -> list[float] | str:
    if importlib.util.find_spec("lightning") is None:
        return "lightning is not installed"
    import lightning.pytorch as pl

    from eos_toolkit.integrations.lightning import EoSCallback

    model, x, y = model_and_data(s)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    seconds = []

    class Timed(EoSCallback):
        def on_train_batch_end(self, *args, **kwargs):
            seconds.append(timed(lambda: super(Timed, self).on_train_batch_end(*args, **kwargs), "cpu")[1])

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    trainer = pl.Trainer(max_steps=s.steps + 1, callbacks=[Timed([(x, y)], nn.functional.mse_loss, every=1,
                                                                   out=out / "lightning", **solve_options(s))],
                         logger=pl.loggers.CSVLogger(out), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    return seconds[1:]  # the first step's: the preconditioner's first solve sizes its workspace


def hugging_face_row(s: Setting, out: Path) -> list[float] | str:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        return "transformers or accelerate is not installed"
    import transformers

    from eos_toolkit.integrations.huggingface import EoSTrainerCallback

    model, x, y = model_and_data(s)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs, labels):
            return {"loss": nn.functional.mse_loss(self.net(inputs), labels)}

    data = [{"inputs": a, "labels": b} for a, b in zip(x, y)]
    args = transformers.TrainingArguments(output_dir=str(out / "hf"), max_steps=s.steps + 1,
                                          per_device_train_batch_size=len(data), learning_rate=1e-3,
                                          lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, logging_steps=10 ** 6)
    trainer = transformers.Trainer(model=WithLoss(), args=args, train_dataset=data)
    trainer.remove_callback(transformers.PrinterCallback)  # the log lines on stdout
    seconds = []

    class Timed(EoSTrainerCallback):
        def on_step_end(self, *a, **kw):
            seconds.append(timed(lambda: super(Timed, self).on_step_end(*a, **kw), "cpu")[1])

    Timed.attach(trainer, data, n=len(data), chunk_size=len(data), every=1, out=out / "hf-record",
                 **solve_options(s))
    trainer.train()
    return seconds[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512, help="tracking examples (one chunk)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--products", type=int, default=8, help="products of each solve (tol=0)")
    parser.add_argument("--steps", type=int, default=8, help="tracking steps timed per row")
    parser.add_argument("--method", default="reuse_graph", help="the pinned product rule")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("examples", "width", "products", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setting(args.examples, args.width, args.products, args.steps, args.method, args.seed)
    print(f"tanh MLP 64-{s.width}-{s.width}-10, {s.examples} examples, Adam; each tracking step two solves of "
          f"{s.products} products ({s.method}); medians of {s.steps} tracking steps; "
          f"{torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        rows = {"tracker.measure": tracker_row(s), "plain loop": plain_loop_row(s, out),
                "lightning": lightning_row(s, out), "hugging face": hugging_face_row(s, out)}
        base = statistics.median(rows["tracker.measure"])
        print(f"  {'row':<18}{'ms per tracking step':>22}{'/ tracker.measure':>20}")
        for name, seconds in rows.items():
            if isinstance(seconds, str):
                print(f"  {name:<18}  skipped: {seconds}")
                continue
            median = statistics.median(seconds)
            print(f"  {name:<18}{median * 1e3:>22.1f}{median / base:>20.2f}")
        print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
