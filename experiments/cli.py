"""The ``eos`` command line: thin typer commands over the library.

    eos demo                         GD, Adam and VRAdam at the edge of stability, with plots
    eos tasks                        the tasks and the options each reads
    eos run TASK [options]           one training run with sharpness tracking
    eos resume RUN_DIR               continue a killed run from its last checkpoint
    eos flow RUN_DIR                 the central flow of a full-batch run, beside a replay of it
    eos sweep SPEC [--jobs N]        a grid of runs with equal tuning budgets (or print commands)
    eos compare run SPEC             the fair comparison: tune, select, confirm over seeds, report
    eos compare worker | report      one more tuning worker; the report rebuilt from the records
    eos runs list [DIR]              the runs under DIR
    eos export tensorboard RUN...    run records as TensorBoard scalars
    eos plot RUN_OR_DIR... [--kind]  stability figures
    eos report RUN_OR_DIR...         a self-contained report
    eos data list | fetch NAME       data sets here, and getting them
    eos bench optimizer | sharpness | lm | distributed | monitor | gpu  benchmarks

Every command's help is its docstring; ``eos COMMAND --help`` shows it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from eos_toolkit import metrics as names
from experiments.tasks import TASKS  # names and one-line summaries; imports no torch

app = typer.Typer(help="Edge-of-stability experiments: VRAdam and baselines with live sharpness tracking.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
runs_app = typer.Typer(help="Inspect run records.", no_args_is_help=True)
data_app = typer.Typer(help="Data sets: what is here, and getting what is not.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (ratios against baselines measured in the same run).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

# Where this project's code lives: a warning raised there is printed as one plain line.
_OWN_CODE = tuple(str(Path(importlib.util.find_spec(name).origin).parent) + os.sep
                  for name in ("vradam", "eos_toolkit", "experiments", "analysis"))


@app.callback()
def _set_up_process() -> None:
    # Every command: freed tensor memory is reused, not unmapped and faulted in again (experiments.host_memory),
    # and this project's warnings are printed as one plain line (torch's own keep Python's format).
    from experiments.host_memory import keep_freed_memory

    keep_freed_memory()
    warnings.showwarning = _one_line_warning


_PYTHON_SHOWWARNING = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if str(filename).startswith(_OWN_CODE):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def clear_errors(command):
    """Turn the library's input errors into one line and a non-zero exit, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
            raise fail(str(exc)) from None

    return wrapper


@contextlib.contextmanager
def progress_bar(description: str):
    """A rich progress bar; yields ``on_step(step, total)`` for the training loop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=None)

        def on_step(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        yield on_step


def _print_result(result) -> None:
    keys = (names.TRAIN_LOSS, names.split_metric(names.TRACK, "acc"), names.SHARPNESS, names.THRESHOLD,
            names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD, names.ETA)
    summary = ", ".join(f"{k}={result.final[k]:.4g}" for k in keys if k in result.final)
    typer.echo(f"{result.status} at step {result.step}: {summary}")
    typer.echo(f"record: {result.run_dir}")


def _parse_set(assignments: list[str]) -> dict:
    values = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = raw
    return values


def _launch(nproc: int, argv: list[str]) -> None:
    """Run ``python -m experiments <argv>`` on ``nproc`` local processes with torchrun; exit with its status."""
    import subprocess

    from experiments.distributed import LAUNCH_COMMAND, torchrun_command

    command = torchrun_command(nproc, argv)
    typer.echo(f"launching {nproc} processes: {' '.join(command)}", err=True)
    env = dict(os.environ, **{LAUNCH_COMMAND: " ".join(["eos", *sys.argv[1:]])})
    code = subprocess.run(command, env=env).returncode
    if code:
        raise fail(f"the {nproc}-process run exited with status {code} (see the ranks' output above)", code=1)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run(task: str, config: Optional[Path], set_: list[str], out: Path, name: Optional[str],
         nproc: Optional[int], **options):
    """Train one model while tracking sharpness against the optimizer's stability threshold.

    TASK is one of the tasks 'eos tasks' lists (images full batch or
    minibatch, a causal Transformer language model, a GFlowNet). Every
    RunConfig key is an option; defaults (from experiments.config.RunConfig
    and each task) work offline on the data found by --data auto.
    Precedence: defaults < --config FILE < options < --set KEY=VALUE.
    """
    from experiments.resolve import resolve_config
    from experiments.train import default_run_dir, train

    from experiments import distributed

    overrides = dict(options, task=task)
    overrides.update(_parse_set(set_))
    cfg = resolve_config(config, **overrides)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a directory (or not exist yet)")
    if nproc is not None and not distributed.launched():
        import tempfile

        if cfg.device != "cpu" and _cuda_count() and nproc > _cuda_count():
            raise ValueError(f"--nproc {nproc} asks for one GPU per process but this machine has "
                             f"{_cuda_count()}; use --nproc {_cuda_count()} or --device cpu")
        run_dir = out / name if name else default_run_dir(cfg, out)
        with tempfile.TemporaryDirectory() as tmp:  # the resolved config, read by every rank
            resolved = Path(tmp) / "config.json"
            resolved.write_text(json.dumps(cfg.to_dict()))
            _launch(nproc, ["run", cfg.task, "--config", str(resolved), "--out", str(out), "--name", run_dir.name])
        return
    group = distributed.setup(cfg.device)
    main = group is None or group.is_main
    _, run_dir = distributed.on_main_rank(group, lambda: (None, out / name if name else default_run_dir(cfg, out)))
    try:
        with progress_bar(cfg.label) if main else contextlib.nullcontext() as on_step:
            result = train(cfg, run_dir, on_step=on_step)
    finally:
        distributed.leave(group)
    if main:
        _print_result(result)


def _run_signature() -> inspect.Signature:
    """``eos run``'s parameters: the command's own, then one option per RunConfig key.

    Each key's type, default and help come from its declaration in
    experiments.config.RunConfig (``config_keys``), so an option never
    restates a type. Mappings (model_options, schedule_options) go through
    --set or --config, as JSON.
    """
    from experiments.config import config_keys
    from experiments.resolve import CHOICES

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("task", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str, default=typer.Argument(
            ..., help=" | ".join(TASKS) + " ('eos tasks' says what each is and which options it reads)")),
        inspect.Parameter("config", keyword, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="JSON or YAML file of RunConfig keys.", rich_help_panel="Run record")),
        inspect.Parameter("set_", keyword, annotation=list[str], default=typer.Option(
            [], "--set", help="Any RunConfig key, KEY=VALUE with a JSON value (repeatable); the way to give "
                              "model_options and schedule_options.", rich_help_panel="Run record")),
        inspect.Parameter("out", keyword, annotation=Path, default=typer.Option(
            Path("runs"), help="Parent directory of run records.", rich_help_panel="Run record")),
        inspect.Parameter("name", keyword, annotation=Optional[str], default=typer.Option(
            None, help="Run directory name (default: task-optimizer-lr-seed-time).", rich_help_panel="Run record")),
        inspect.Parameter("nproc", keyword, annotation=Optional[int], default=typer.Option(
            None, min=1, help="Data-parallel processes on this machine (one per GPU, or CPU processes): runs "
                              "this command under torchrun. Several machines: see README.")),
    ]
    for key in config_keys():
        if key.name == "task" or key.type is dict:
            continue
        flag = key.name.replace("_", "-")
        decls = [f"--{flag}/--no-{flag}"] if key.type is bool else [f"--{flag}"]
        if key.name == "dataset":
            decls.append("--data")
        shown = "" if key.default is None else f" [default: {key.default}]"
        choices = f"; one of {', '.join(CHOICES[key.name])}" if key.name in CHOICES else ""
        params.append(inspect.Parameter(key.name, keyword, annotation=Optional[key.type], default=typer.Option(
            None, *decls, help=key.help + choices + shown, rich_help_panel=key.section.capitalize(),
            envvar="EOS_DATA_DIR" if key.name == "data_dir" else None, show_default=False)))
    return inspect.Signature(params)


run = clear_errors(_run)
run.__signature__ = _run_signature()
app.command(name="run")(run)


@app.command()
def tasks():
    """The tasks, one line each, and the RunConfig keys each reads beyond the common ones."""
    from experiments.tasks import TASKS, task_class

    for name, (_, _, summary) in TASKS.items():
        cls = task_class(name)
        defaults = ", ".join(f"{k}={v}" for k, v in cls.defaults.items())
        typer.echo(f"{name}\n  {summary}\n  reads: {', '.join(cls.options)}\n  defaults: {defaults}")
        if getattr(cls, "model_options", None):
            typer.echo(f"  model_options: {cls.model_options}")
    typer.echo("Common to every task: optimizer and its hyperparameters, schedule, steps, tracking (track_*), seed, "
               "device, dtype; see experiments/config.py.")


@app.command()
@clear_errors
def resume(run_dir: Path = typer.Argument(..., help="A run record directory."),
           nproc: Optional[int] = typer.Option(None, min=1, help="Processes, as many as the run started with "
                                                                "(a data-parallel run).")):
    """Continue a killed or interrupted run from its last checkpoint (same metrics as an uninterrupted run)."""
    from experiments import distributed
    from experiments.train import resume as resume_run

    if nproc is not None and not distributed.launched():
        _launch(nproc, ["resume", str(run_dir)])
        return
    group = distributed.setup()
    main = group is None or group.is_main
    try:
        with progress_bar(f"resume {run_dir.name}") if main else contextlib.nullcontext() as on_step:
            result = resume_run(run_dir, on_step=on_step)
    finally:
        distributed.leave(group)
    if main:
        _print_result(result)


@app.command()
@clear_errors
def flow(run_dir: Path = typer.Argument(..., help="A finished full-batch run record (gd, rmsprop, adam, adamw "
                                                  "or vradam; momentum 0 where it applies, no weight decay)."),
         start: int = typer.Option(0, min=0, help="The step the flow starts from (the replay's weights and "
                                                  "optimizer state there); it must be at or below its threshold."),
         steps: Optional[int] = typer.Option(None, min=1, help="Units of flow time (optimizer steps); default: "
                                                              "to the run's last step."),
         substeps: int = typer.Option(4, min=1, help="Refreshes (eigenpairs, third derivatives, the oscillation) "
                                                     "per step; Euler micro steps in between as stiffness needs."),
         k: int = typer.Option(3, min=1, help="Top eigenpairs tracked (the edge may hold up to k)."),
         tol: float = typer.Option(1e-4, help="Lanczos residual tolerance per substep."),
         replace: bool = typer.Option(False, "--replace", help="Integrate again over a flow already recorded.")):
    """Integrate the central flow of a full-batch run beside a replay of the run, into the same record.

    The flow (Cohen et al., ICLR 2025; Adam and VRAdam as this toolkit's
    extension, eos_toolkit/flow_rules.py) predicts the time-averaged
    trajectory at the edge of stability: its loss and predicted loss,
    sharpness held at the threshold, and the oscillation's variance, written
    as flow_* metrics with the real iterate's displacement from it.  Then:
    eos plot RUN_DIR --kind flow.
    """
    from experiments.flow import integrate_flow

    with progress_bar(f"flow {run_dir.name}") as on_step:
        result = integrate_flow(run_dir, start=start, steps=steps, substeps=substeps, k=k, tol=tol,
                                replace=replace, on_step=on_step)
    typer.echo(f"central flow ({result.rule}) over {result.steps} steps: "
               f"{result.flow_seconds_per_step:.3g} s per unit of flow time, replay step "
               f"{result.replay_seconds_per_step:.3g} s "
               f"({result.flow_seconds_per_step / max(result.replay_seconds_per_step, 1e-12):.3g}x); "
               f"replay matches the record's train loss to {result.replay_max_rel_diff:.2g} (relative)")
    if result.saturated:
        typer.echo(f"note: all {k} tracked eigenvalues were at the edge at some step; more may have been "
                   f"(rerun with --k {k + 1} --replace)")
    import analysis

    a = analysis.flow_agreement(analysis.load_run(result.run_dir))
    if a["edge_steps"]:
        typer.echo(f"edge phase: {a['edge_steps']:.0f} steps from step {a['edge_onset']:.0f}; predicted loss vs "
                   f"the real loss averaged over {analysis.AVERAGE_WINDOW} steps: median error "
                   f"{a['loss_error_median']:.1%}, 90th percentile {a['loss_error_p90']:.1%}, means over the phase "
                   f"{a['loss_error_of_means']:+.1%}; sharpness / threshold: flow {a['flow_sharpness_ratio_mean']:.3f}, "
                   f"run {a.get('real_sharpness_ratio_mean', float('nan')):.3f}; measured / predicted oscillation "
                   f"(means over the phase) {a.get('variance_ratio_of_means', float('nan')):.2f}")
    else:
        typer.echo("the flow never reached its threshold: no edge phase to compare")
    typer.echo(f"record: {result.run_dir}")


@app.command()
@clear_errors
def sweep(
    spec: Path = typer.Argument(..., help="Sweep file (JSON/YAML): base, grid, seeds."),
    out: Path = typer.Option(Path("runs/sweep"), help="Parent directory of the sweep's runs."),
    jobs: int = typer.Option(1, help="Runs in parallel on this machine."),
    print_commands: bool = typer.Option(False, "--print-commands",
                                        help="Write the configs and print one 'eos run' per line; run nothing."),
    allow_unequal_budget: bool = typer.Option(False, help="Allow optimizers different numbers of configurations."),
):
    """Run a grid of configurations x seeds; every optimizer gets the same tuning budget.

    Finished runs under --out are kept and incomplete ones resumed, so a
    sweep can be re-run after an interruption. See experiments/sweep.py.
    """
    from experiments.sweep import commands, load_sweep, run_sweep, write_configs

    runs = load_sweep(spec, allow_unequal_budget)
    if print_commands:
        write_configs(runs, out)
        for line in commands(runs, out):
            typer.echo(line)
        return
    typer.echo(f"{len(runs)} runs into {out} ({jobs} at a time)")
    statuses = run_sweep(runs, out, jobs=jobs, on_done=lambda name, status: typer.echo(f"{name}: {status}"))
    failed = [n for n, s in statuses.items() if s.startswith("failed")]
    if failed:
        raise fail(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", code=1)


compare_app = typer.Typer(
    help="Compare optimizers fairly: equal tuning budgets, selection on validation, several seeds, CIs, conclusions. "
         "The spec's keys are documented in experiments/compare.py.",
    no_args_is_help=True, context_settings={"help_option_names": ["--help", "-h"]})
app.add_typer(compare_app, name="compare")

# The spec and the options that read it, shared by 'eos compare run' and 'eos compare worker'.
COMPARE_SPEC = typer.Argument(None, metavar="SPEC", help="A spec file (YAML/JSON); or give --preset NAME.",
                              show_default=False)
COMPARE_PRESET = typer.Option(None, help="A shipped spec: cnn-fashion, lm-brown, gfn-hypergrid, vradam-vs-clip, "
                                         "vradam-vs-eta-avg (experiments/presets/).")
COMPARE_OUT = typer.Option(Path("runs/compare"), help="Parent directory; the comparison goes to OUT/<name>.")
COMPARE_STORAGE = typer.Option(None, help="Optuna storage URL (default: sqlite in the comparison directory); "
                                          "workers on other machines name the same URL.")
COMPARE_SCALE = typer.Option(1.0, help="Multiply the spec's steps and n_train (bigger machines).")
COMPARE_ALLOW_UNEQUAL_BUDGET = typer.Option(False, help="Allow optimizers different numbers of trials or steps.")


def _spec_or_preset(spec: Optional[str], preset: Optional[str]) -> str:
    """The spec file or the preset's name, whichever of the two was given."""
    if (spec is None) == (preset is None):
        raise ValueError("give a spec file or --preset NAME (one of them)")
    return spec if preset is None else preset


@compare_app.command("run")
@clear_errors
def compare_run(
    spec: Optional[str] = COMPARE_SPEC,
    preset: Optional[str] = COMPARE_PRESET,
    out: Path = COMPARE_OUT,
    workers: int = typer.Option(1, help="Processes running trials (and confirmation runs) on this machine."),
    storage: Optional[str] = COMPARE_STORAGE,
    scale: float = COMPARE_SCALE,
    allow_unequal_budget: bool = COMPARE_ALLOW_UNEQUAL_BUDGET,
):
    """Tune, select, confirm over seeds, report (resumes what is done).

    Every optimizer gets the same number of trials and steps; the tuning runs
    are scored on validation only; the selected configurations are re-run on
    fresh seeds and compared on test with confidence intervals, paired
    differences and conclusions in OUT/<name>/report.md.
    """
    from experiments.compare import run_compare

    report = run_compare(_spec_or_preset(spec, preset), out, workers=workers, storage=storage,
                         allow_unequal_budget=allow_unequal_budget, scale=scale, echo=typer.echo)
    typer.echo(f"report: {report}")
    for line in (report.read_text().split("## Conclusions")[1].split("## Figures")[0].strip().splitlines()):
        typer.echo(line)


@compare_app.command("worker")
@clear_errors
def compare_worker(
    spec: Optional[str] = COMPARE_SPEC,
    preset: Optional[str] = COMPARE_PRESET,
    out: Path = COMPARE_OUT,
    storage: Optional[str] = COMPARE_STORAGE,
    scale: float = COMPARE_SCALE,
    allow_unequal_budget: bool = COMPARE_ALLOW_UNEQUAL_BUDGET,
):
    """Only tune, as one more worker on the same --storage.

    The worker claims whole trials from the database until every optimizer's
    budget is complete; 'eos compare run' with the same spec then selects,
    confirms and reports. Workers on other machines share the comparison
    directory and the --storage database, and use the same spec and --scale.
    """
    from experiments.compare import load_spec, tune

    loaded = load_spec(_spec_or_preset(spec, preset), allow_unequal_budget, scale)
    tune(loaded, out / loaded.name, storage, echo=typer.echo)
    typer.echo(f"tuning of {loaded.name} is complete")


@compare_app.command("report")
@clear_errors
def compare_report(directory: Path = typer.Argument(..., metavar="DIR",
                                                   help="A comparison directory (OUT/<name>).")):
    """Rebuild DIR/report.md from the records alone and print its path.

    The records are the comparison's spec.json, selection.json and run
    records; the Optuna database is not needed.
    """
    from analysis.compare import write_compare_report

    typer.echo(str(write_compare_report(directory)))


@app.command()
@clear_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the runs and figures go."),
    data: str = typer.Option("auto", help="Data set (auto picks the first available)."),
    data_dir: Optional[str] = typer.Option(None, envvar="EOS_DATA_DIR"),
    steps: Optional[int] = typer.Option(None, help="Override every run's step count (quick looks)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
):
    """Gradient descent, Adam and VRAdam at the edge of stability, then the stability plots.

    Full-batch training of a tanh MLP (784-200-200-10, MSE) on a class-balanced
    1,000-image subset: GD's sharpness rises to 2/eta and hovers there; Adam's
    preconditioned sharpness settles at 38/lr; VRAdam's gate throttles eta_t
    early on. Writes the records, figures and a report under --out.
    """
    from experiments.demo import run_demo

    paths = run_demo(out, dataset=data, data_dir=data_dir, steps=steps, device=device, progress=progress_bar)
    typer.echo("figures:")
    for p in paths:
        typer.echo(f"  {p}")


@runs_app.command("list")
@clear_errors
def runs_list(directory: Path = typer.Argument(Path("runs"), help="Directory to search for run records.")):
    """A table of runs: task, optimizer, lr, status, steps, final train loss."""
    from rich.console import Console
    from rich.table import Table

    from eos_toolkit.record import DamagedRecordError, find_runs, read_run

    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    table = Table("run", "task", "optimizer", "lr", "status", "step", "train loss")
    found = find_runs(directory)
    if not found:
        raise FileNotFoundError(f"no run records (directories with config.json) under {directory}")
    for path in found:
        name = str(path.relative_to(directory)) if path != directory else path.name
        try:
            r = read_run(path)
        except DamagedRecordError as exc:  # one damaged record must not hide the others
            typer.echo(f"warning: {exc}", err=True)
            table.add_row(name, "?", "?", "?", "damaged", "-", "-")
            continue
        m = r.metrics
        loss = m[m.metric == names.TRAIN_LOSS]
        last_step = int(m.step.max()) if len(m) else 0
        table.add_row(name, r.config.get("task", "?"),
                      r.config.get("optimizer", "?"), f"{r.config.get('lr', float('nan')):g}", r.status,
                      str(last_step), f"{loss.value.iloc[-1]:.4g}" if len(loss) else "-")
    Console(width=160).print(table)


@app.command()
@clear_errors
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories or parents of them."),
    kind: str = typer.Option("all", help="sharpness | loss | damping | spectrum | density | comparison | gflownet | flow "
                                         "(analysis.FIGURE_KINDS), or all (the default set)"),
    out: Path = typer.Option(Path("figures"), help="Output directory."),
):
    """Write stability figures (PNG and PDF) and print their paths."""
    import analysis

    if kind != "all" and kind not in analysis.FIGURE_KINDS:
        raise ValueError(f"unknown --kind {kind!r}; allowed: {', '.join(analysis.FIGURE_KINDS)}, all")
    loaded = analysis.load_runs([str(r) for r in runs])
    for path in analysis.save_figures(loaded, out, kinds=analysis.DEFAULT_KINDS if kind == "all" else (kind,)):
        typer.echo(str(path))


@app.command()
@clear_errors
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories or parents of them."),
    out: Path = typer.Option(Path("report"), help="Output directory."),
):
    """Write one self-contained report: config, environment, status, figures, summary table."""
    import analysis

    typer.echo(str(analysis.write_report([str(r) for r in runs], out)))


export_app = typer.Typer(help="Existing run records in other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("tensorboard")
@clear_errors
def export_tensorboard(
    runs: list[Path] = typer.Argument(..., help="Run directories or parents of them."),
    out: Path = typer.Option(Path("runs/tensorboard"), help="TensorBoard log directory (one subdirectory per run)."),
):
    """Write every run record's metrics as TensorBoard scalars, eos/<metric> at each step; print the log directories.

    View them with: tensorboard --logdir OUT. Needs the tensorboard package
    (pip install 'eos-toolkit[integrations]').
    """
    from eos_toolkit.integrations.tensorboard import export_records

    missing = [str(r) for r in runs if not r.exists()]
    if missing:
        raise ValueError(f"{', '.join(missing)} does not exist; give run directories or parents of them")
    written = export_records(runs, out)
    if not written:
        raise ValueError(f"no run record under {', '.join(map(str, runs))}")
    for log_dir in written:
        typer.echo(str(log_dir))


@data_app.command("list")
@clear_errors
def data_list(data_dir: Optional[str] = typer.Option(None, envvar="EOS_DATA_DIR")):
    """The data sets this machine has, where each came from, and how to get the missing ones."""
    from rich.console import Console
    from rich.table import Table

    from experiments.data import available_datasets

    table = Table("name", "kind", "available", "where / how to get")
    for entry in available_datasets(data_dir):
        table.add_row(entry.name, entry.kind, "yes" if entry.available else "no",
                      entry.where if entry.available else entry.how_to_get)
    Console(width=160).print(table)


@data_app.command("fetch")
@clear_errors
def data_fetch(name: str = typer.Argument(..., help="fashion-mnist | mnist5k | cifar10 | brown | gutenberg"),
               data_dir: Optional[str] = typer.Option(None, envvar="EOS_DATA_DIR")):
    """Get a data set (explicitly; nothing is ever downloaded silently)."""
    from experiments.data import fetch_dataset

    typer.echo(str(fetch_dataset(name, data_dir=data_dir)))


def _bench(module: str, ctx: typer.Context) -> None:
    import importlib

    importlib.import_module(module).main(list(ctx.args))


@bench_app.command("optimizer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_optimizer(ctx: typer.Context):
    """Optimizer step time: VRAdam paths vs torch AdamW (extra arguments go to the benchmark; try --help)."""
    _bench("experiments.benchmarks.optimizer_step", ctx)


@bench_app.command("sharpness", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_sharpness(ctx: typer.Context):
    """HVP cost and eigensolver matvecs vs scipy eigsh (extra arguments go to the benchmark; try --help)."""
    _bench("experiments.benchmarks.sharpness", ctx)


@bench_app.command("lm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_lm(ctx: typer.Context):
    """Language model: tokens/s of a training step and HVP / gradient ratios (extra arguments go to the benchmark)."""
    _bench("experiments.benchmarks.language_model", ctx)


@bench_app.command("monitor", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_monitor(ctx: typer.Context):
    """One tracking step's cost: the monitor in a plain loop, Lightning and Trainer vs the measurement alone."""
    _bench("experiments.benchmarks.monitor_cost", ctx)


@bench_app.command("distributed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_distributed(ctx: typer.Context):
    """Step and HVP time on 1 vs N data-parallel ranks (extra arguments go to the benchmark; try --help)."""
    _bench("experiments.benchmarks.distributed", ctx)


@bench_app.command("gpu", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_gpu(ctx: typer.Context):
    """The GPU check: gpu tests, fused step vs reference, syncs, CUDA graph, step timing, curvature, a tracked run.

    One line per item (PASS, FAIL or SKIP), exit status 1 when one fails; without CUDA the CUDA items skip
    (extra arguments go to the check: --items, --json, --smoke; try --help).
    """
    _bench("experiments.benchmarks.gpu_check", ctx)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
