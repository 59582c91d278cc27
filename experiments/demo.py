"""``eos demo``: three full-batch runs at the edge of stability, then their figures and report.

The classic setting of Cohen et al. (2021, 2022) at laptop scale: a tanh MLP
(784-200-200-10) trained with MSE on one-hot targets on a class-balanced
1,000-image subset, every step on the whole subset.

- Gradient descent at eta = 0.04: the sharpness rises (progressive sharpening)
  from about 39 to 2/eta = 50 by step ~200 and hovers there (within about 10%)
  while the loss keeps falling non-monotonically; a spectral density (stochastic
  Lanczos quadrature) every 200 steps shows the outliers leaving the bulk.
- Adam at lr = 2e-3: the preconditioned sharpness settles at 38/lr = 19,000.
- VRAdam at lr = 2e-3 (beta3 = 1, alpha1 = 10): early large velocities throttle
  eta_t below lr; once they shrink, eta_t = lr and it behaves like Adam.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from experiments.config import RunConfig
from experiments.resolve import resolve
from experiments.train import train

DEMO_RUNS = {
    "gd": dict(optimizer="gd", lr=0.04, steps=800, track_density_every=200),
    "adam": dict(optimizer="adam", lr=2e-3, steps=300),
    "vradam": dict(optimizer="vradam", lr=2e-3, beta3=1.0, alpha1=10.0, steps=300),
}
DEMO_COMMON = dict(task="eos-fullbatch", model="mlp-tanh", loss="mse", n_train=1000, track_every=10, track_k=2)


def demo_configs(dataset: str = "auto", data_dir: str | None = None, steps: int | None = None,
                 device: str = "auto") -> dict[str, RunConfig]:
    """The demo's run configurations, by short name."""
    configs = {}
    for name, options in DEMO_RUNS.items():
        values = {**DEMO_COMMON, **options, "dataset": dataset, "data_dir": data_dir, "device": device}
        if steps is not None:
            values["steps"] = steps
        configs[name] = resolve(RunConfig(**values))
    return configs


def run_demo(out: str | Path, *, dataset: str = "auto", data_dir: str | None = None, steps: int | None = None,
             device: str = "auto", progress=None) -> list[Path]:
    """Run the demo into ``out`` (a new directory) and return the paths of its figures and report.

    ``progress(description)`` is an optional context manager yielding an
    ``on_step(step, total)`` callback (the CLI passes a rich progress bar).
    """
    import analysis

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    run_dirs = []
    for name, cfg in demo_configs(dataset, data_dir, steps, device).items():
        bar = progress(cfg.label) if progress is not None else contextlib.nullcontext(None)
        with bar as on_step:
            result = train(cfg, out / name, on_step=on_step)
        run_dirs.append(result.run_dir)
    runs = analysis.load_runs([str(d) for d in run_dirs])
    figures = analysis.save_figures(runs, out / "figures", kinds=(*analysis.DEFAULT_KINDS, "density"))
    report = analysis.write_report([str(d) for d in run_dirs], out / "report")
    return [*figures, report]
