"""RunConfig: defaults per task, validation messages, file loading and precedence."""

import json

import pytest

from experiments.config import ConfigError, RunConfig, load_config_file
from experiments.resolve import resolve, resolve_config


def test_task_defaults():
    fb = resolve(RunConfig(task="eos-fullbatch"))
    assert (fb.model, fb.loss, fb.n_train, fb.steps, fb.checkpoint_every) == ("mlp-tanh", "mse", 5000, 1000, 10)
    assert fb.track_precond is False and fb.label == "GD lr=0.05"
    ic = resolve(RunConfig(task="image-classification", optimizer="vradam", lr=1e-3))
    assert (ic.model, ic.loss, ic.epochs, ic.steps) == ("cnn-small", "cross-entropy", 10, None)
    assert ic.track_precond is True and ic.label == "VRAdam lr=0.001"


@pytest.mark.parametrize("key, value, message", [
    ("task", "nope", "unknown task 'nope'; allowed: eos-fullbatch, image-classification"),
    ("optimizer", "lion", "unknown optimizer 'lion'; allowed: gd, sgd"),
    ("lr", -0.1, "lr must be a finite number > 0, got -0.1"),
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("beta1", 1.0, "beta1 must be in [0, 1), got 1.0"),
    ("steps", -5, "steps must be an integer > 0, got -5"),
    ("steps", 2.5, "steps must be an integer or unset (null), got 2.5"),
    ("track_every", 0, "track_every must be an integer > 0, got 0"),
    ("gate", "momentum", "unknown gate 'momentum'; allowed: velocity, gradient"),
    ("device", "tpu", "unknown device 'tpu'"),
    ("checkpoint_every", 15, "checkpoint_every (15) must be a multiple of track_every (10)"),
    ("track_precond", True, "track_precond needs an optimizer with a preconditioner; 'gd' has none"),
    ("density_probes", 0, "density_probes must be an integer > 0, got 0"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError) as info:
        resolve(RunConfig(**{key: value}))
    assert message in str(info.value)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        RunConfig.from_dict({"learning_rate": 0.1})


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"optimizer": "adam", "lr": 0.002, "steps": 50}))
    cfg = resolve_config(p, lr=0.004, steps=None)
    assert (cfg.optimizer, cfg.lr, cfg.steps) == ("adam", 0.004, 50)
    y = tmp_path / "c.yaml"
    y.write_text("optimizer: vradam\nbeta3: 0.5\nschedule_options: {T_max: 10}\n")
    cfg = resolve_config(y)
    assert (cfg.optimizer, cfg.beta3, cfg.schedule_options) == ("vradam", 0.5, {"T_max": 10})


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config_file(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(lst)


def test_schedule_names_are_checked_up_front():
    with pytest.raises(ConfigError, match="unknown schedule 'Bogus'; allowed: constant, .*CosineAnnealingLR"):
        resolve(RunConfig(schedule="Bogus"))
    assert resolve(RunConfig(schedule="OneCycleLR")).schedule == "OneCycleLR"
