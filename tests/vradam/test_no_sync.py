"""The step never reads a device value back on the host.

Three checks. The strict one: the step runs on the "meta" device, whose tensors
hold no values, so any ``.item()``, ``float()``, ``bool()`` or Python ``min`` on
one raises. The traced one: under ``torch.compile(fullgraph=True)`` the step is
one graph without ``item`` nodes (dynamo drops reads whose value goes unused and
turns ``min(tensor, float)`` into a clamp, so this check alone is weaker); it
also runs the tensor bias-correction branch used for on-device step counts.
On CUDA the step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

from tests.vradam.helpers import clone_params, fill_grads, make_params
from vradam import VRAdam, VRAdamReference

OPTIONS = [
    dict(gate="velocity", norm_scope="global"),
    dict(gate="gradient", norm_scope="group", power=1.5, maximize=True),
]


def _two_groups(params, **kwargs):
    return VRAdam(
        [{"params": params[:2]}, {"params": params[2:], "lr": 2e-2, "alpha1": 0.5}],
        lr=5e-2, **kwargs,
    )


def _backend_without_host_reads(graph_module, example_inputs):
    """A compile backend that runs the graph eagerly after checking it reads nothing back."""
    reads = [
        node for node in graph_module.graph.nodes
        if node.target in ("item", "tolist", torch.ops.aten._local_scalar_dense.default)
    ]
    assert not reads, f"the step reads device values back: {reads}"
    return graph_module.forward


@pytest.mark.parametrize("options", OPTIONS, ids=["velocity-global", "gradient-group"])
@pytest.mark.parametrize("foreach", [False, True])
def test_step_compiles_to_one_graph_and_matches_reference(foreach, options):
    torch._dynamo.reset()
    params = make_params(seed=7)
    twins = clone_params(params)
    opt = _two_groups(params, foreach=foreach, **options)
    ref = VRAdamReference(
        [{"params": twins[:2]}, {"params": twins[2:], "lr": 2e-2, "alpha1": 0.5}],
        lr=5e-2, **options,
    )
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=_backend_without_host_reads)
    for _ in range(3):
        fill_grads(params)
        fill_grads(twins)
        compiled_step()  # a graph break or a host read in the graph raises here
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for k in range(2):
        torch.testing.assert_close(opt.telemetry(k)["eta"], ref.telemetry(k)["eta"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_step_runs_on_meta_tensors(foreach, capturable):
    """Meta tensors hold no data: reading one back raises, so the step must not."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in [(3, 4), (5,)]]
    opt = _two_groups(params + [torch.nn.Parameter(torch.empty(2, device="meta"))],
                      foreach=foreach, capturable=capturable)
    for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    tel = opt.telemetry(1)
    assert tel["eta"].device.type == "meta" and tel["clamped"].dtype == torch.bool
    step = opt.state[params[0]]["step"]
    assert step.device.type == ("meta" if capturable else "cpu")
    if not capturable:
        assert step.item() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_step_has_no_sync(foreach, capturable):
    params = [torch.nn.Parameter(t.cuda()) for t in make_params(seed=8, dtype=torch.float32)]
    opt = _two_groups(params, foreach=foreach, capturable=capturable)
    fill_grads(params)
    opt.step()  # first step creates the state (allocations are not syncs, but keep it out)
    fill_grads(params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        telemetry = opt.telemetry(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert telemetry["eta"].device.type == "cuda"
