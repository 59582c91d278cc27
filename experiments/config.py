"""Run configuration: the schema of a run, its type and range checks, and config files.

A leaf: this module imports nothing of the project. What needs the tasks or
the optimizers to complete a config (task defaults, allowed names, the
default label) is :mod:`experiments.resolve`, above it. Precedence: the
dataclass defaults < a config file (``--config FILE``) < options given on the
command line. The resolved configuration is what a run record stores in
config.json, so a run can be repeated or resumed from its record.

Example:
    >>> RunConfig(task="eos-fullbatch", optimizer="gd", lr=-1.0).check()
    Traceback (most recent call last):
    ...
    experiments.config.ConfigError: lr must be a finite number > 0, got -1.0
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names it and what is allowed."""


@dataclass
class RunConfig:
    """Everything that defines a run. Field comments are the CLI's documentation.

    Rates: ``lr`` is the maximal rate (VRAdam's alpha_0); schedules scale it.
    Weight decay defaults to 0 for every optimizer so that comparisons at the
    edge of stability are not confounded by it; set it explicitly.
    """

    task: str = "eos-fullbatch"  # the task (eos tasks lists them)
    # images: fashion-mnist | mnist | mnist5k | cifar10 | digits | auto;
    # text: wikitext-2 | brown | gutenberg | shakespeare | text:PATH | auto
    dataset: str = "auto"
    data_dir: str | None = None  # where data sets live (default $EOS_DATA_DIR, else ~/.cache/eos-toolkit/data)
    model: str | None = None  # default per task: mlp-tanh, cnn-small, transformer, mlp (gflownet)
    model_options: dict = field(default_factory=dict)  # e.g. {"batchnorm": true}, {"hidden": [512]}, {"n_layer": 2}
    loss: str | None = None  # images: mse | cross-entropy; default per task (text: cross-entropy, gflownet: objective)
    n_train: int | None = None  # training examples (images: class-balanced subset; text, full batch: windows)
    full_batch: bool | None = None  # every step on the whole training set (default per task)
    context: int = 64  # language-model: tokens per window
    vocab_size: int = 10_000  # language-model, word-level corpora built here (brown): words kept, <unk> the rest
    eval_n: int | None = None  # examples (text: windows) per val/test evaluation (gflownet: recent samples)
    # gflownet: the hypergrid {0..height-1}^ndim, reward R0 + R1 [outer band] + R2 [inner band]
    ndim: int = 2  # the VRAdam paper's 8 x 8 grid world; ndim=4 is the literature's harder standard
    height: int = 8  # gflownet: states per axis
    R0: float = 0.1  # gflownet: base reward everywhere
    R1: float = 0.5  # gflownet: reward added on the outer band
    R2: float = 2.0  # gflownet: reward added on the inner band (the modes)
    objective: str = "tb"  # gflownet: tb (trajectory balance) | db (detailed balance) | fm (flow matching)
    backward_policy: str = "uniform"  # gflownet: uniform over parents | learned
    epsilon: float = 0.0  # gflownet: epsilon-uniform exploration mixed into the sampling policy
    log_z_lr_factor: float = 100.0  # gflownet, trajectory balance: log Z's rate / lr (0.1 vs 1e-3, Malkin et al.)
    # optimizer
    optimizer: str | None = None  # default per task (gd for images, adamw for language-model)
    lr: float | None = None  # default per task
    momentum: float = 0.9  # momentum / nesterov
    beta1: float = 0.9  # Adam family: first-moment decay
    beta2: float = 0.999  # Adam family, RMSprop (its alpha): second-moment decay
    eps: float = 1e-8  # Adam family, RMSprop: added to the root of the second moment
    weight_decay: float = 0.0  # decoupled (AdamW, VRAdam) or L2 (the others); 0 by default for every optimizer
    beta3: float = 1.0  # VRAdam
    alpha1: float = 10.0  # VRAdam
    gate: str = "velocity"  # VRAdam: the norm that throttles the rate
    power: float = 2.0  # VRAdam gate exponent
    norm_scope: str = "global"  # VRAdam: one norm over all parameters, or one per param group
    no_decay_groups: bool = False  # weight decay only on weight matrices: biases and norms, embeddings in own groups
    clip_norm: float | None = None  # clip the gradient's global norm to this (recorded as grad_norm per step)
    schedule: str = "constant"  # constant or any torch.optim.lr_scheduler class name
    schedule_options: dict = field(default_factory=dict)  # keyword arguments of the schedule, e.g. {"T_max": 1000}
    warmup_steps: int = 0  # linear warmup steps before the schedule
    # budget
    steps: int | None = None  # optimizer steps; default 1000 (eos-fullbatch)
    epochs: int | None = None  # image-classification: passes over the training split (default 10)
    batch_size: int | None = None  # minibatch tasks; default per task (128 images, 32 text windows)
    val_fraction: float = 0.1  # image-classification
    augment: bool = True  # image-classification
    target_loss: float | None = None  # stop when the train loss reaches it
    target_acc: float | None = None  # stop when the tracked accuracy reaches it
    # tracking
    track_every: int | None = None  # measure every N steps; default per task (10 images, 50 text)
    track_k: int = 1  # top-k eigenvalues
    track_precond: bool | None = None  # preconditioned sharpness lambda_max(P^-1 H); default: on where the optimizer has a P
    track_n: int | None = None  # minibatch tasks: examples (windows) in the fixed tracking subset
    track_density_every: int = 0  # SLQ spectral density every N steps (0 = never)
    density_probes: int = 4  # SLQ: random probes per density (cost: probes x steps Hessian-vector products)
    density_steps: int = 60  # SLQ: Lanczos steps per probe
    hvp_method: str = "auto"  # Hessian-vector products: auto (the fastest accurate, timed on the first measurement) or one of eos_toolkit.settings.METHODS
    hessian_bn_mode: str = "batch_stats"  # BatchNorm inside Hessian products: batch statistics or running ones
    chunk_size: int | None = None  # examples per chunk for full-batch gradients and HVPs (1000 images, 32 windows)
    lanczos_tol: float = 1e-3  # relative residual at which Lanczos stops
    lanczos_max_iter: int = 60  # Hessian-vector products per measurement, at most
    # run
    seed: int = 0  # model initialisation, data order, probes
    device: str = "auto"  # auto: cuda when there is one
    dtype: str = "float32"  # parameters and data
    checkpoint_every: int | None = None  # default: track_every
    evaluate_test: bool = True  # evaluate the test split at the end (off for tuning runs: selection never sees it)
    diverge_factor: float = 1e3  # diverged when loss > factor * initial loss (or NaN/Inf)
    label: str | None = None  # legend label; default "<Optimizer> lr=<lr>"

    # --- checks ----------------------------------------------------------------
    def check(self) -> "RunConfig":
        """Check every value's type and range (ConfigError naming the value and what is allowed); returns self.

        Keys left unset (None) must be optional; :func:`experiments.resolve.resolve`
        fills the task's defaults first and checks the names that other tables
        own (task, optimizer, Hessian settings, schedule).
        """
        self.check_types()
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _positive("lr", self.lr)
        _in_unit_interval("momentum", self.momentum)
        _in_unit_interval("beta1", self.beta1)
        _in_unit_interval("beta2", self.beta2)
        _non_negative("eps", self.eps)
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("beta3", self.beta3)
        _non_negative("alpha1", self.alpha1)
        _positive("power", self.power)
        _non_negative_int("warmup_steps", self.warmup_steps)
        for name in ("n_train", "steps", "epochs", "batch_size", "track_n", "eval_n"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("track_every", "track_k", "chunk_size", "lanczos_max_iter", "checkpoint_every",
                     "density_probes", "density_steps", "context"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool) and self.vocab_size >= 3):
            raise ConfigError(f"vocab_size must be an integer >= 3, got {self.vocab_size!r}")
        if self.clip_norm is not None:
            _positive("clip_norm", self.clip_norm)
        _non_negative_int("track_density_every", self.track_density_every)
        _non_negative_int("seed", self.seed)
        _positive("lanczos_tol", self.lanczos_tol)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not self.diverge_factor > 1.0:
            raise ConfigError(f"diverge_factor must be > 1, got {self.diverge_factor!r}")
        if self.checkpoint_every % self.track_every:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of track_every ({self.track_every}): "
                "metrics are written at tracking steps, and a checkpoint must not be ahead of them")
        return self

    def check_types(self) -> None:
        """Every key against its annotation above, the one declaration of its type (ConfigError otherwise)."""
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
        for key in config_keys():
            value = getattr(self, key.name)
            if value is None:
                if not key.optional:
                    raise ConfigError(f"{key.name} must be set, got None")
                continue
            if isinstance(value, bool) or key.type is bool:
                ok = isinstance(value, bool) and key.type is bool
            elif key.type is float:
                ok = isinstance(value, (int, float))
            else:
                ok = isinstance(value, key.type)
            if not ok:
                wanted = names[key.type] + (" or unset (null)" if key.optional else "")
                raise ConfigError(f"{key.name} must be {wanted}, got {value!r}")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ConfigError(f"data_dir {self.data_dir!r} is not a directory")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ConfigKey:
    """One RunConfig key as declared above: the CLI's options are made from these."""

    name: str
    type: type  # bool, int, float, str or dict (the annotation without its None)
    optional: bool  # None allowed (usually: "default per task")
    default: Any
    help: str  # the comment beside the field (and the comment lines just above it)
    section: str  # the section comment the field sits under (task and data, optimizer, budget, tracking, run)


@functools.lru_cache(maxsize=None)
def config_keys() -> tuple[ConfigKey, ...]:
    """Every RunConfig key with its type, default and documentation, read from the class itself.

    Types come from the annotations (the same ones ``check_types`` enforces),
    help from the comments in the class body, so a key is declared once.

    >>> lr = next(k for k in config_keys() if k.name == "lr")
    >>> lr.type, lr.optional, lr.section
    (<class 'float'>, True, 'optimizer')
    """
    hints = typing.get_type_hints(RunConfig)
    docs, pending, section = {}, [], "task and data"
    for line in inspect.getsource(RunConfig).splitlines():
        if re.fullmatch(r"    # [a-z ]+", line) and len(line.split()) <= 4:
            section, pending = line.strip("# ").strip(), []  # a section heading: "# optimizer"
        elif line.startswith("    # "):
            pending.append(line.strip()[2:])  # a comment above the next field
        elif m := re.match(r"    (\w+): [^=]+= .*?(?:  # (.*))?$", line):
            docs[m.group(1)] = (section, " ".join(pending + [m.group(2) or ""]).strip())
            pending = []
        elif line.startswith("    def "):
            break
    keys = []
    for f in fields(RunConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        section, doc = docs.get(f.name, ("run", ""))
        keys.append(ConfigKey(f.name, args[0], type(None) in typing.get_args(hints[f.name]), default, doc, section))
    return tuple(keys)


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or YAML config file into a dict (keys as in :class:`RunConfig`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"config file {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return values


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: Any) -> None:
    if not (_is_number(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not (_is_number(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def _in_unit_interval(name: str, value: Any) -> None:
    if not (_is_number(value) and 0 <= value < 1):
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{name} must be an integer > 0, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
