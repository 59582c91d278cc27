"""Hessian-vector products against dense torch.func.hessian in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eos_toolkit.hvp import HessianOperator, NondeterministicOperatorError, hessian_operator, select_parameters
from eos_toolkit.settings import METHODS
from eos_toolkit.solvers import lanczos
from eos_toolkit.tracker import SharpnessTracker
from tests.eos_toolkit.reference import (
    DT,
    BatchNormHeadCNN,
    batch_norm_head_loss,
    CausalBlock,
    SmallCNN,
    cnn_loss_plain,
    dense_hessian,
    flat_params,
    regression_data,
    tanh_mlp,
)

mse = nn.functional.mse_loss


def assert_products_match(op, H, n_columns: int = 3, rtol: float = 1e-9):
    """matvec and matmat equal H @ v; finite differences get a looser tolerance."""
    if op.method == "finite_difference":
        rtol = 1e-5
    g = torch.Generator().manual_seed(7)
    V = torch.randn(op.dim, n_columns, generator=g, dtype=DT)
    expected = H @ V
    scale = expected.abs().max()
    assert (op.matvec(V[:, 0]) - expected[:, 0]).abs().max() <= rtol * scale
    assert (op.matmat(V) - expected).abs().max() <= rtol * scale


@pytest.mark.parametrize("method", METHODS)
def test_tanh_mlp_all_methods(method):
    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x, y)], method=method)
    assert_products_match(op, dense_hessian(model, mse, x, y))
    assert op.n_matvecs == 1 + 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bn_mode", ["eval", "batch_stats"])
def test_cnn_with_batchnorm(method, bn_mode):
    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    x = torch.randn(6, 1, 6, 6, dtype=DT)
    y = torch.randn(6, 3, dtype=DT)
    model.train()
    model(x)  # non-trivial running statistics
    model.train()  # the operator must not care which mode the caller left
    saved = {n: b.clone() for n, b in model.named_buffers()}
    H = torch.func.hessian(cnn_loss_plain)(flat_params(model, [n for n, _ in model.named_parameters()]),
                                          model, x, y, bn_mode == "batch_stats")
    op = hessian_operator(model, mse, [(x, y)], method=method, bn_mode=bn_mode)
    assert_products_match(op, H)
    for n, b in model.named_buffers():
        assert torch.equal(b, saved[n]), f"buffer {n} changed"
    assert model.training and model.bn.training and model.bn.track_running_stats


@pytest.mark.parametrize("method", ["forward_over_reverse", "reuse_graph"])
def test_batchnorm_with_batch_statistics_over_several_chunks(method):
    """Several chunks need the loss-reduction check, whose forward pass must not be a batch of one (which
    BatchNorm1d refuses in training mode); each chunk is normalised by its own statistics."""
    torch.manual_seed(0)
    model = BatchNormHeadCNN().to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 1, 5, 5, generator=g, dtype=DT), torch.randn(9, 2, generator=g, dtype=DT)
    chunks = [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])]
    H = torch.autograd.functional.hessian(
        lambda flat: batch_norm_head_loss(flat, model, chunks),
        flat_params(model, [n for n, _ in model.named_parameters()]), vectorize=True)
    op = hessian_operator(model, mse, chunks, method=method, bn_mode="batch_stats")
    assert_products_match(op, H)
    tracker = SharpnessTracker(model, mse, chunks, bn_mode="batch_stats", tol=1e-10)
    assert tracker.measure()["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


@pytest.fixture(scope="module")
def transformer_case():
    torch.manual_seed(0)
    model = CausalBlock().to(DT)
    x = torch.randn(2, 5, 4, dtype=DT)
    y = torch.randn(2, 5, 4, dtype=DT)
    return model, x, y, dense_hessian(model, mse, x, y, engine="autograd")


@pytest.mark.parametrize("method", METHODS)
def test_causal_transformer_block(method, transformer_case):
    model, x, y, H = transformer_case
    op = hessian_operator(model, mse, [(x, y)], method=method)
    assert_products_match(op, H)


def test_fused_attention_falls_back_to_math_kernel(transformer_case):
    math_model, x, y, H = transformer_case
    fused_model = CausalBlock(fused=True).to(DT)
    fused_model.load_state_dict(math_model.state_dict())
    op = hessian_operator(fused_model, mse, [(x, y)])
    with pytest.warns(RuntimeWarning, match="math attention"):
        assert_products_match(op, H)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_subset_is_the_block_of_the_full_hessian(method):
    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, mse, x, y)
    sizes = [p.numel() for _, p in model.named_parameters()]
    starts = torch.tensor([0] + sizes).cumsum(0)
    chosen = ["2.weight", "4.bias"]
    idx = torch.cat([torch.arange(starts[names.index(n)], starts[names.index(n) + 1]) for n in chosen])
    op = hessian_operator(model, mse, [(x, y)], params=chosen, method=method)
    assert op.names == chosen and op.dim == idx.numel()
    assert_products_match(op, H[idx][:, idx])
    by_predicate = hessian_operator(model, mse, [(x, y)], params=lambda n, p: n.startswith("2."))
    assert by_predicate.names == ["2.weight", "2.bias"]


@pytest.mark.parametrize("method", METHODS)
def test_unequal_chunks_equal_full_batch(method):
    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    chunks = [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])]
    op = hessian_operator(model, mse, chunks, method=method)
    assert op.chunk_weights == [0.3, 0.5, 0.2]
    assert_products_match(op, dense_hessian(model, mse, x, y))


def test_cross_entropy_with_integer_targets():
    model = tanh_mlp()
    x, _ = regression_data(10, 5, 3)
    labels = torch.arange(10) % 3
    ce = nn.functional.cross_entropy
    op = hessian_operator(model, ce, [(x[:4], labels[:4]), (x[4:], labels[4:])])
    assert_products_match(op, dense_hessian(model, ce, x, labels))


def test_float32_model_with_float64_solver_vectors():
    model = tanh_mlp().float()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x.float(), y.float())], dtype=DT)
    H = dense_hessian(tanh_mlp(), mse, x, y)  # same weights in float64
    v = torch.randn(op.dim, dtype=DT)
    out = op.matvec(v)
    assert out.dtype == DT
    assert (out - H @ v).abs().max() <= 1e-5 * (H @ v).abs().max()


def _classifier_data(n: int = 12):
    x, _ = regression_data(n, 5, 3)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 1, 2, 2, 1, 0])[:n]
    return x, labels


@pytest.mark.parametrize("kind", ["class_weights", "ignore_index", "smoothing_with_weights"])
def test_loss_with_its_own_normaliser(kind):
    """A loss that divides by a chunk-dependent normaliser: refused without chunk weights, exact with them."""
    model = tanh_mlp()
    x, labels = _classifier_data()
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=DT)
    if kind == "class_weights":
        def loss(out, y):
            return nn.functional.cross_entropy(out, y, weight=weight)
        normaliser = lambda y: float(weight[y].sum())  # noqa: E731
    elif kind == "ignore_index":
        labels = labels.clone()
        labels[[1, 2, 3, 9]] = -100

        def loss(out, y):
            return nn.functional.cross_entropy(out, y, ignore_index=-100)
        normaliser = lambda y: float((y != -100).sum())  # noqa: E731
    else:
        def loss(out, y):
            return nn.functional.cross_entropy(out, y, weight=weight, label_smoothing=0.1)
        normaliser = lambda y: float(weight[y].sum())  # noqa: E731
    chunks = [(x[:5], labels[:5]), (x[5:], labels[5:])]
    with pytest.raises(ValueError, match="not an unweighted mean.*chunk_weights"):
        hessian_operator(model, loss, chunks)
    op = hessian_operator(model, loss, chunks, chunk_weights=[normaliser(y) for _, y in chunks])
    assert_products_match(op, dense_hessian(model, loss, x, labels))  # the full-batch loss, one chunk


def test_weighting_is_caught_whatever_the_parameters_and_in_any_chunk():
    """A zero read-out makes every example's loss equal, and padding may sit in the last of many chunks."""
    model = tanh_mlp()
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    x, labels = _classifier_data()
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=DT)

    def weighted(out, y):
        return nn.functional.cross_entropy(out, y, weight=weight)

    with pytest.raises(ValueError, match="not an unweighted mean"):
        hessian_operator(model, weighted, [(x[:5], labels[:5]), (x[5:], labels[5:])])
    padded = labels.clone()
    padded[-1] = -100  # one ignored target, in the last of six chunks

    def ignoring(out, y):
        return nn.functional.cross_entropy(out, y, ignore_index=-100)

    chunks = [(x[i:i + 2], padded[i:i + 2]) for i in range(0, 12, 2)]
    with pytest.raises(ValueError, match="chunk 5"):
        hessian_operator(tanh_mlp(), ignoring, chunks)


def test_chunk_weights_are_checked():
    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    with pytest.raises(ValueError, match="chunk_weights must be 2 finite numbers"):
        hessian_operator(model, mse, [(x[:5], y[:5]), (x[5:], y[5:])], chunk_weights=[1.0])
    with pytest.raises(ValueError, match="chunk_weights must be 2 finite numbers"):
        hessian_operator(model, mse, [(x[:5], y[:5]), (x[5:], y[5:])], chunk_weights=[1.0, -1.0])


def test_finite_differences_in_float32_are_accurate_at_large_parameter_norms():
    """lambda_1 from float32 finite differences within 3e-5 of the dense float64 value, |theta| = 14.

    The step scales with the root-mean-square parameter, not |theta|: scaling it by |theta| gave 6e-4 here.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    exact = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model).double(), mse, x.double(), y.double(),
                                                engine="autograd"))[-1]
    op = hessian_operator(model, mse, [(x, y)], method="finite_difference", dtype=DT)
    assert float(op.flat_parameters().norm()) > 10
    estimate = lanczos(op, 1, max_iter=200, tol=1e-8).eigenvalues[0]
    assert abs(float(estimate / exact) - 1) < 3e-5


def test_flatten_unflatten_round_trip():
    model = tanh_mlp()
    x, y = regression_data(4, 5, 3)
    op = hessian_operator(model, mse, [(x, y)])
    v = torch.arange(op.dim, dtype=DT)
    parts = op.unflatten(v)
    assert [p.shape for p in parts] == [p.shape for p in model.parameters()]
    assert torch.equal(op.flatten(parts), v)
    assert torch.equal(op.flatten(dict(zip(op.names, parts))), v)
    assert torch.equal(op.flat_parameters(), flat_params(model, op.names))


def test_determinism_probe_fires_for_dropout_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    model.train()
    x, y = regression_data(10, 5, 3)
    with pytest.raises(NondeterministicOperatorError, match="dropout"):
        hessian_operator(model, mse, [(x, y)], dropout="as_is", determinism_probe=True)
    with pytest.raises(NondeterministicOperatorError, match="dropout"):
        hessian_operator(model, mse, [(x, y)], dropout="as_is")  # probed by default when dropout is left on
    hessian_operator(model, mse, [(x, y)], dropout="as_is", determinism_probe=False)  # asked for explicitly
    op = hessian_operator(model, mse, [(x, y)], determinism_probe=True)  # dropout="off": fine
    model.eval()
    assert_products_match(op, dense_hessian(model, mse, x, y))


def test_bad_arguments_raise_value_errors():
    model = tanh_mlp()
    x, y = regression_data(4, 5, 3)
    with pytest.raises(ValueError, match="method"):
        hessian_operator(model, mse, [(x, y)], method="exact")
    with pytest.raises(ValueError, match="bn_mode"):
        hessian_operator(model, mse, [(x, y)], bn_mode="train")
    with pytest.raises(ValueError, match="unknown parameter"):
        select_parameters(model, ["nope"])
    with pytest.raises(ValueError, match="empty"):
        hessian_operator(model, mse, [])
    op = hessian_operator(model, mse, [(x, y)])
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.dim + 1, dtype=DT))


class LSTMRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_fused_rnn_kernel_falls_back_to_plain_kernels():
    """float32 LSTMs on the CPU run oneDNN's fused kernel, which has no forward-mode AD."""
    torch.manual_seed(0)
    model = LSTMRegressor()
    x = torch.randn(4, 5, 3, dtype=DT)
    y = torch.randn(4, 2, dtype=DT)
    H = dense_hessian(copy.deepcopy(model).to(DT), mse, x, y, engine="autograd")
    op = hessian_operator(model, mse, [(x.float(), y.float())], dtype=DT)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(7), dtype=DT)
    with pytest.warns(RuntimeWarning, match="cuDNN and oneDNN off"):
        product = op.matvec(v)
    assert (product - H @ v).abs().max() <= 1e-4 * (H @ v).abs().max()


# -- reuse_graph inside a measurement, and the "auto" choice ------------------------------------

def test_reuse_graph_keeps_its_graphs_for_one_measurement_only():
    import gc
    import weakref

    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    H = dense_hessian(model, mse, x, y)
    op = hessian_operator(model, mse, [(x[:4], y[:4]), (x[4:], y[4:])], method="reuse_graph")
    with op.measurement():
        assert_products_match(op, H)
        graphs = op._graphs[1]
        first = lanczos(op, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        second = lanczos(op, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        assert op._graphs[1] is graphs  # built once, on the first product
        probe = weakref.ref(graphs[0][1][0])  # a first-order gradient that holds the graph
    del graphs
    gc.collect()
    assert op._graphs is None and probe() is None  # freed when the measurement ends
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert torch.allclose(first.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-9)


def test_reuse_graph_rebuilds_when_a_parameter_changes_in_place():
    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x, y)], method="reuse_graph")
    with op.measurement():
        op.matvec(torch.ones(op.dim, dtype=DT))
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)  # an optimizer step inside the block
        assert_products_match(op, dense_hessian(model, mse, x, y))


def test_reuse_graph_falls_back_to_double_backward_when_its_graphs_do_not_fit(monkeypatch):
    """The second chunk's graph does not fit: the first one's is freed before the fallback's product."""
    import gc
    import weakref

    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x[:5], y[:5]), (x[5:], y[5:])], method="reuse_graph")
    real_graph, real_double_backward = type(op)._chunk_graph, type(op)._double_backward
    built = []

    def second_does_not_fit(self, *chunk):
        if built:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        graph = real_graph(self, *chunk)
        built.append(weakref.ref(graph[1][0]))
        return graph

    def double_backward_after_freeing(self, block):
        gc.collect()
        assert built[0]() is None, "the partial graphs are still alive during the fallback"
        monkeypatch.setattr(type(op), "_chunk_graph", real_graph)
        return real_double_backward(self, block)

    monkeypatch.setattr(type(op), "_chunk_graph", second_does_not_fit)
    monkeypatch.setattr(type(op), "_double_backward", double_backward_after_freeing)
    with op.measurement(), pytest.warns(RuntimeWarning, match="do not fit"):
        assert_products_match(op, dense_hessian(model, mse, x, y))
    assert op._reuse_fits is False and op.method == "reuse_graph"


def test_reuse_graph_with_a_fused_kernel_rebuilds_its_graphs_with_plain_kernels(transformer_case):
    math_model, x, y, H = transformer_case
    fused_model = CausalBlock(fused=True).to(DT)
    fused_model.load_state_dict(math_model.state_dict())
    op = hessian_operator(fused_model, mse, [(x, y)], method="reuse_graph")
    with op.measurement(), pytest.warns(RuntimeWarning, match="math attention"):
        assert_products_match(op, H)


def test_the_determinism_probe_fires_with_reuse_graph_inside_a_measurement():
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(noisy, mse, [(x, y)], method="reuse_graph", dropout="as_is", determinism_probe=False)
    with op.measurement(), pytest.raises(NondeterministicOperatorError):
        op.check_determinism()


def test_auto_chooses_by_cost_per_measurement_from_given_timings():
    from eos_toolkit.method_choice import AUTO_PRODUCTS_PER_MEASUREMENT, MethodTiming, cheapest_method

    def t(first, product, error=0.0):
        return MethodTiming(first, product, error)

    base = {"forward_over_reverse": t(3.0, 3.0), "double_backward": t(2.5, 2.5), "finite_difference": t(2.0, 2.0)}
    # reuse_graph: graphs cost 1.0 once, then 1.2 a product: 10 x 1.2 + 1.0 = 13 < 10 x 2.0
    assert cheapest_method({**base, "reuse_graph": t(2.2, 1.2)}) == "reuse_graph"
    # the same product cost with graphs that cost 10 a measurement: 22 > 20 for finite differences
    assert cheapest_method({**base, "reuse_graph": t(11.2, 1.2)}) == "finite_difference"
    # finite differences off by 1e-4 relative are not eligible however fast
    inaccurate = {**base, "finite_difference": t(0.1, 0.1, error=1e-4), "reuse_graph": t(30.0, 3.0)}
    assert cheapest_method(inaccurate) == "double_backward"
    # ties go to the earlier method; the amortisation length is a parameter
    assert cheapest_method({m: t(1.0, 1.0) for m in METHODS}) == "forward_over_reverse"
    assert cheapest_method({**base, "reuse_graph": t(11.2, 1.2)}, products=100) == "reuse_graph"
    assert AUTO_PRODUCTS_PER_MEASUREMENT == 10
    with pytest.raises(ValueError, match="no Hessian-vector product method agrees"):
        cheapest_method({"finite_difference": t(1.0, 1.0, error=1e-3)})


def test_the_choice_counts_its_products_and_measures_agreement():
    from eos_toolkit.method_choice import choose_method

    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x[:6], y[:6]), (x[6:], y[6:])])
    choice = choose_method(op, torch.randn(op.dim, dtype=DT, generator=torch.Generator().manual_seed(1)))
    timings = choice.timings
    assert set(timings) == set(METHODS) and next(iter(timings)) == "forward_over_reverse"  # the reference first
    # two for forward-over-reverse and reuse_graph, one for finite differences, none for double
    # backward (its product is reuse_graph's first)
    assert op.n_matvecs == choice.n_matvecs == 5
    assert timings["double_backward"].product_seconds == timings["reuse_graph"].first_seconds
    assert op.method == choice.method and choice.failed == {}
    assert timings["forward_over_reverse"].relative_error == 0.0
    assert timings["double_backward"].relative_error <= 1e-12 and timings["reuse_graph"].relative_error <= 1e-12
    assert 0 < timings["finite_difference"].relative_error <= 1e-6  # float64: about 1e-10
    assert all(t.first_seconds > 0 and t.product_seconds > 0 for t in timings.values())
    # float32: finite differences cannot reach 1e-5 (eps^(2/3) = 2.4e-5), so they are not timed
    single = hessian_operator(tanh_mlp().float(), mse, [(x.float(), y.float())])
    chosen = choose_method(single, torch.ones(single.dim))
    assert "finite_difference" not in chosen.timings and chosen.n_matvecs == 4


def test_the_choice_syncs_before_each_timed_product_and_times_per_column(monkeypatch):
    """Queued work of the caller is not charged to the product timed next; a block's time is per column."""
    import eos_toolkit.method_choice as method_choice

    x, y = regression_data(10, 5, 3)
    op = hessian_operator(tanh_mlp(), mse, [(x, y)])
    events, clock = [], iter(range(1000))
    real_apply = type(op)._apply
    monkeypatch.setattr(type(op), "synchronize", lambda self: events.append("sync"))
    monkeypatch.setattr(type(op), "_apply", lambda self, block: events.append("product") or real_apply(self, block))
    monkeypatch.setattr(method_choice.time, "perf_counter", lambda: events.append("clock") or float(next(clock)))
    choice = method_choice.choose_method(op, torch.randn(op.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(0)))
    starts = [i for i, e in enumerate(events) if e == "product"]
    assert len(starts) == 5 and all(events[i - 2:i] == ["sync", "clock"] for i in starts)
    # the fake clock moves by 1 between a product's two readings: half a second a column of the 2-column blocks
    assert all(t.first_seconds == t.product_seconds == 0.5 for t in choice.timings.values())


def test_a_method_that_disagrees_is_never_chosen(monkeypatch):
    """reuse_graph off by 1% (and double backward, whose figure is reuse_graph's product): never chosen."""
    from eos_toolkit.method_choice import choose_method

    x, y = regression_data(10, 5, 3)
    op = hessian_operator(tanh_mlp().float(), mse, [(x.float(), y.float())])
    monkeypatch.setattr(type(op), "_reuse_graph", lambda self, block: 1.01 * self._double_backward(block))
    choice = choose_method(op, torch.randn(op.dim, generator=torch.Generator().manual_seed(0)))
    assert choice.n_matvecs == 4  # float32: no finite differences
    assert choice.timings["reuse_graph"].relative_error == pytest.approx(0.01, rel=1e-3)
    assert choice.method == "forward_over_reverse" == op.method


def test_a_method_that_fails_on_the_model_is_left_out_and_said(monkeypatch):
    from eos_toolkit.method_choice import choose_method

    model = tanh_mlp()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(model, mse, [(x, y)])

    def no_forward_mode(self, block):
        raise RuntimeError("jvp: this custom Function has no forward-mode rule")

    monkeypatch.setattr(type(op), "_forward_over_reverse", no_forward_mode)
    choice = choose_method(op, torch.ones(op.dim, dtype=DT))
    timings = choice.timings
    assert "forward_over_reverse" not in timings and "no forward-mode rule" in choice.failed["forward_over_reverse"]
    assert next(iter(timings)) == "reuse_graph" and timings["reuse_graph"].relative_error == 0.0  # the reference now
    assert timings["double_backward"].relative_error == 0.0  # its figure is the reference's own product
    assert choice.as_record()["failed"] == choice.failed


@pytest.mark.parametrize("reference", ["forward_over_reverse", "reuse_graph"])
def test_the_choice_names_a_random_operator_before_choosing(monkeypatch, reference):
    """The reference's two products of one vector each run the model (reuse_graph's graphs are dropped
    between them): with dropout left on they differ, and that is the determinism probe's error."""
    from eos_toolkit.method_choice import choose_method

    if reference == "reuse_graph":
        monkeypatch.setattr(HessianOperator, "_forward_over_reverse",
                            lambda self, block: (_ for _ in ()).throw(RuntimeError("jvp: no forward-mode rule")))
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    x, y = regression_data(10, 5, 3)
    op = hessian_operator(noisy, mse, [(x, y)], dropout="as_is", determinism_probe=False)
    with pytest.raises(NondeterministicOperatorError, match="dropout"):
        choose_method(op, torch.ones(op.dim, dtype=DT))


def test_loss_and_gradient_is_the_full_batch_loss_and_gradient_over_unequal_chunks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(11, 3, dtype=torch.float64), torch.randn(11, 2, dtype=torch.float64)
    op = hessian_operator(model, nn.functional.mse_loss, [(x[:7], y[:7]), (x[7:], y[7:])])
    loss, grad = op.loss_and_gradient()
    expected = nn.functional.mse_loss(model(x), y)
    expected_grad = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in expected_grad]))


def test_an_operator_is_freed_without_the_cycle_collector():
    # No reference cycle: an operator (and the process group it holds) goes with its last reference.
    import gc
    import weakref

    model = nn.Linear(2, 1)
    op = hessian_operator(model, nn.functional.mse_loss, [(torch.randn(3, 2), torch.randn(3, 1))])
    ref = weakref.ref(op)
    gc.disable()
    try:
        del op
        assert ref() is None
    finally:
        gc.enable()
