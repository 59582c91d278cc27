"""Bad inputs, table-driven: each exits non-zero with one line that names the bad value, never a traceback."""

import gzip
import json

import pytest
import torch
from typer.testing import CliRunner

from experiments.cli import app
from tests.experiments.idx import IDX_NAMES
from vradam import VRAdam

runner = CliRunner()
RUN = ["run", "eos-fullbatch", "--device", "cpu"]

CLI_CASES = [  # (arguments, text the error must contain)
    (RUN + ["--set", "lr=abc"], "lr must be a number or unset (null), got 'abc'"),
    (RUN + ["--set", "target_loss=abc"], "target_loss must be a number or unset (null), got 'abc'"),
    (RUN + ["--set", "track_precond=maybe"], "track_precond must be true or false or unset (null), got 'maybe'"),
    (RUN + ["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (RUN + ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (RUN + ["--set", "beta1=1.5"], "beta1 must be in [0, 1), got 1.5"),
    (RUN + ["--steps", "0"], "steps must be an integer > 0, got 0"),
    (RUN + ["--track-every", "0"], "track_every must be an integer > 0, got 0"),
    (RUN + ["--gate", "momentum"], "unknown gate 'momentum'"),
    (RUN + ["--norm-scope", "layer"], "unknown norm_scope 'layer'"),
    (RUN + ["--schedule", "Nope"], "unknown schedule 'Nope'"),
    (RUN + ["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0, got -1"),
    (RUN + ["--set", "chunk_size=0"], "chunk_size must be an integer > 0, got 0"),
    (RUN + ["--dtype", "float16"], "unknown dtype 'float16'"),
    (RUN + ["--set", "hessian_bn_mode=train"], "unknown hessian_bn_mode 'train'"),
    (RUN + ["--set", "checkpoint_every=15"], "checkpoint_every (15) must be a multiple of track_every (10)"),
    (RUN + ["--set", "colour=blue"], "unknown config key(s) ['colour']"),
    (RUN + ["--set", "clip_norm=-1"], "clip_norm must be a finite number > 0, got -1"),
    (RUN + ["--set", "vocab_size=2"], "vocab_size must be an integer >= 3, got 2"),
    (RUN + ["--set", "full_batch=maybe"], "full_batch must be true or false or unset (null), got 'maybe'"),
    (RUN + ["--set", "evaluate_test=2"], "evaluate_test must be true or false, got 2"),
    (RUN + ["--set", "seed=-3"], "seed must be an integer >= 0, got -3"),
    (RUN + ["--data-dir", "/nonexistent/data"], "data_dir '/nonexistent/data' is not a directory"),
    (RUN + ["--set", "model_options=[1, 2]"], "model_options must be a mapping, got [1, 2]"),
    (RUN + ["--set", "diverge_factor=0.5"], "diverge_factor must be > 1, got 0.5"),
    (RUN + ["--set", "density_probes=0"], "density_probes must be an integer > 0, got 0"),
    (RUN + ["--set", "track_precond=true", "--optimizer", "gd"], "track_precond needs an optimizer with a preconditioner"),
    (RUN + ["--hvp-method", "fast"], "unknown hvp_method 'fast'; allowed: auto, forward_over_reverse"),
    (RUN + ["--nproc", "0"], "Invalid value for '--nproc'"),
    (RUN + ["--steps", "2.5"], "Invalid value for '--steps'"),
    (["run", "nope"], "unknown task 'nope'"),
    (["run", "language-model", "--set", "context=0"], "context must be an integer > 0, got 0"),
    (["run", "gflownet", "--set", "epsilon=abc"], "epsilon must be a number, got 'abc'"),
    (["resume", "/nonexistent/run"], "/nonexistent/run is not a run record"),
    (["plot", "/nonexistent/run", "--kind", "bogus"], "unknown --kind 'bogus'"),
    (["compare", "run", "--preset", "no-such-preset"], "no spec file 'no-such-preset' and no preset of that name"),
    (["compare", "run"], "give a spec file or --preset NAME (one of them)"),
    (["compare", "worker", "a.yaml", "--preset", "cnn-fashion"], "give a spec file or --preset NAME (one of them)"),
    (["compare", "report"], "Missing argument 'DIR'"),
    (["compare", "report", "/nonexistent/comparison"], "No such file or directory: '/nonexistent/comparison/spec.json"),
    (["data", "fetch", "mnist"], "mnist cannot be fetched"),
    (["data", "fetch", "imagenet"], "unknown data set 'imagenet'"),
]


def assert_clear_error(result, expected: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert expected in result.output, result.output


@pytest.mark.parametrize("args, expected", CLI_CASES, ids=[" ".join(a[1:]) for a, _ in CLI_CASES])
def test_bad_command_line_inputs(args, expected):
    assert_clear_error(runner.invoke(app, args), expected)


def test_bad_files_and_records(tmp_path, tiny_data_dir):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "afile").write_text("x")
    spec = {"optimizers": {"adamw": {"trials": 2}, "vradam": {"trials": 3}}}
    (tmp_path / "unequal.json").write_text(json.dumps(spec))
    (tmp_path / "peek.json").write_text(json.dumps({"optimizers": {"adamw": {}, "vradam": {}},
                                                    "metric": "test_loss"}))
    (tmp_path / "sweep.json").write_text(json.dumps({"seed": 1}))
    cases = [
        (RUN + ["--config", tmp_path / "missing.yaml"], "cannot read config file"),
        (RUN + ["--config", tmp_path / "bad.json"], "is not valid JSON"),
        (RUN + ["--config", tmp_path / "list.yaml"], "must hold a mapping of keys to values, got list"),
        (RUN + ["--out", tmp_path / "afile", "--data-dir", tiny_data_dir], f"--out {tmp_path / 'afile'} is a file"),
        (RUN + ["--data", "nope"], "unknown data set 'nope'"),
        (["compare", "run", tmp_path / "unequal.json"], "unequal tuning budgets {'adamw': 2, 'vradam': 3}"),
        (["compare", "worker", tmp_path / "peek.json"], "metric 'test_loss' is not allowed"),
        (["sweep", tmp_path / "sweep.json"], "unknown sweep key(s) ['seed']"),
        (["runs", "list", tmp_path / "empty"], "does not exist"),
    ]
    for args, expected in cases:
        assert_clear_error(runner.invoke(app, [str(a) for a in args]), expected)


@pytest.mark.parametrize("damage, expected", [
    ("truncated_gzip", "cannot be read: EOFError"),
    ("bad_magic", "cannot be read"),
])
def test_damaged_data_files_are_named(tiny_data_dir, damage, expected):
    path = tiny_data_dir / "fashion-mnist" / f"{IDX_NAMES['train'][0]}.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncated_gzip":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(gzip.compress(b"\x00\x00\x09\x09" + raw[4:]))
    result = runner.invoke(app, RUN + ["--data", "fashion-mnist", "--data-dir", str(tiny_data_dir), "--steps", "2"])
    assert_clear_error(result, expected)
    assert str(path) in result.output  # the file is named


@pytest.mark.parametrize("kwargs, expected", [
    (dict(lr=float("inf")), "lr=inf; allowed: 0 <= lr < inf"),
    (dict(betas=0.9), "betas=0.9; allowed: a pair (beta1, beta2)"),
    (dict(weight_decay="0.1"), "weight_decay='0.1'; allowed: a real number"),
    (dict(eps=-1.0), "eps=-1.0; allowed: 0 <= eps < inf"),
    (dict(betas=(0.9, "x")), "betas[1]='x'; allowed: a real number"),
])
def test_bad_optimizer_arguments(kwargs, expected):
    with pytest.raises(ValueError) as err:
        VRAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
    assert expected in str(err.value)


def test_a_param_group_without_params():
    with pytest.raises(ValueError, match="a param group must be a dict with a 'params' entry, got {'lr': 0.1}"):
        VRAdam([{"lr": 0.1}])


def _monitor_case(case: str, tmp_path):
    """Build a monitor (or a framework callback) the way case ``case`` gets it wrong."""
    from eos_toolkit.monitor import EoSMonitor
    from eos_toolkit.record import RunLock

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    adam = torch.optim.Adam(model.parameters())
    if case == "batches":
        return EoSMonitor(model, adam, torch.nn.functional.mse_loss, [(torch.randn(4, 5), y)])
    if case == "pairs":
        return EoSMonitor(model, adam, torch.nn.functional.mse_loss, [x])
    if case == "locked":
        with RunLock(tmp_path / "run"):
            return EoSMonitor(model, adam, torch.nn.functional.mse_loss, [(x, y)], out=tmp_path / "run")
    if case == "hugging_face_without_optimizer":
        hf = pytest.importorskip("eos_toolkit.integrations.huggingface")
        return hf.EoSTrainerCallback([]).on_train_begin(None, None, None, model=model, optimizer=None)
    raise AssertionError(case)


@pytest.mark.parametrize("case, expected", [
    ("batches", "the tracking batches do not fit the model: its forward pass on the first one (input shapes "
                "[(4, 5)]) failed with RuntimeError"),
    ("pairs", "each tracking batch must be a pair (inputs, targets), got Tensor"),
    ("locked", "is being written by pid"),
    ("hugging_face_without_optimizer", "EoSTrainerCallback needs the trainer's optimizer, and there is none yet"),
])
def test_bad_monitor_inputs(case, expected, tmp_path):
    with pytest.raises((ValueError, FileExistsError)) as err:
        _monitor_case(case, tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_optimizer_without_an_adapter_is_one_warning_not_an_error():
    from eos_toolkit.monitor import EoSMonitor, NoAdapterWarning

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.warns(NoAdapterWarning) as caught:
        EoSMonitor(model, torch.optim.Adamax(model.parameters()), torch.nn.functional.mse_loss,
                   [(torch.randn(4, 3), torch.randn(4, 2))])
    (warning,) = caught
    assert "no stability adapter for Adamax" in str(warning.message) and "plain sharpness only" in str(warning.message)


def test_runs_no_central_flow_can_follow(tiny_data_dir, tmp_path):
    """eos flow on a run it cannot follow: a minibatch run, an optimizer without a flow, clipping, weight decay,
    missing data, BatchNorm (torch's third derivatives through batch statistics are wrong)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data_dir, copy)
    common = ["--data", "fashion-mnist", "--n-train", "100", "--track-every", "2", "--device", "cpu", "--steps", "2",
              "--out", str(tmp_path)]
    runs = {
        "minibatch": ["image-classification", "--model", "mlp-tanh", "--set", "batch_size=32"],
        "momentum": ["eos-fullbatch", "--optimizer", "momentum", "--lr", "0.1"],
        "clipped": ["eos-fullbatch", "--optimizer", "gd", "--lr", "0.1", "--set", "clip_norm=1"],
        "decayed": ["eos-fullbatch", "--optimizer", "adamw", "--lr", "0.01", "--set", "weight_decay=0.1"],
        "moved": ["eos-fullbatch", "--optimizer", "gd", "--lr", "0.1"],
        "batchnorm": ["eos-fullbatch", "--optimizer", "gd", "--lr", "0.1", "--model", "cnn-small",
                      "--set", 'model_options={"width": 4, "batchnorm": true}'],
    }
    for name, args in runs.items():
        data = copy if name == "moved" else tiny_data_dir
        made = runner.invoke(app, ["run", *args, *common, "--data-dir", str(data), "--name", name])
        assert made.exit_code == 0, made.output
    shutil.rmtree(copy)
    cases = [
        ("minibatch", "a central flow needs a full-batch run (full_batch=true); task 'image-classification' ran "
                      "minibatches"),
        ("momentum", "no central flow for SGD with momentum=0.9"),
        ("clipped", "no central flow with gradient clipping (clip_norm=1"),
        ("decayed", "no central flow with weight_decay=0.1"),
        ("moved", f"data_dir '{copy}' is not a directory"),
        ("batchnorm", "no central flow through 1 (batch normalisation with batch statistics), 5 (batch "
                      "normalisation with batch statistics): its third derivatives are wrong in torch"),
        ("missing", f"{tmp_path / 'missing'} is not a run record"),
    ]
    for name, expected in cases:
        assert_clear_error(runner.invoke(app, ["flow", str(tmp_path / name)]), expected)
