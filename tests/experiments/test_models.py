"""The model zoo: shapes, parameter counts by hand, seeding, and torch.func compatibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from experiments.models import MODEL_NAMES, build_model


def conv3x3(cin: int, cout: int, bn: bool) -> int:
    return cin * cout * 9 + cout + (2 * cout if bn else 0)


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The layer stack the module docstring describes for each model, with default options.
DOCUMENTED_STACKS = {
    "mlp-tanh": [nn.Flatten, nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear],
    "mlp-relu": [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear],
    "cnn-small": [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2 + [nn.Flatten, nn.Linear],
    "cnn-deep": ([nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.MaxPool2d]) * 3 + [nn.Flatten, nn.Linear],
}


def test_every_model_name_builds_its_documented_layer_stack():
    """Each name in MODEL_NAMES builds the layer types, in order, that the module docstring lists for it."""
    assert sorted(MODEL_NAMES) == sorted(DOCUMENTED_STACKS)
    for name in MODEL_NAMES:
        model = build_model(name, (1, 8, 8), 10, seed=0)
        assert [type(layer) for layer in model] == DOCUMENTED_STACKS[name], name
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10), name


@pytest.mark.parametrize(("name", "act"), [("mlp-tanh", math.tanh), ("mlp-relu", lambda v: max(v, 0.0))])
def test_mlp_output_on_a_known_input_equals_the_hand_computation(name, act):
    """With weights set by hand, the output is w2 . act(W1 x + b1) + b2 worked out with the math module."""
    model = build_model(name, (1, 1, 2), 1, hidden=(2,))
    first, second = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
        first.bias.copy_(torch.tensor([0.0, 0.5]))
        second.weight.copy_(torch.tensor([[2.0, -1.0]]))
        second.bias.copy_(torch.tensor([0.25]))
    out = model(torch.tensor([[[[1.0, -2.0]]]]))
    # pre-activations: (1 * 1 + 0 * -2 + 0, 0.5 * 1 + 1 * -2 + 0.5) = (1, -1)
    assert out.item() == pytest.approx(2.0 * act(1.0) - act(-1.0) + 0.25, rel=1e-6)


def test_cnn_small_output_on_a_known_input_equals_the_hand_computation():
    """All-ones 4 x 4 image, one channel, unit 3 x 3 kernels: the logits follow from counting pixels by hand."""
    model = build_model("cnn-small", (1, 4, 4), 2, width=1)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    (head,) = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [2.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5]))
    out = model(torch.ones(1, 1, 4, 4))
    # conv 1 (padding 1) sums each pixel's in-image 3 x 3 neighbours: 4 at corners, 6 on edges, 9 inside;
    # every 2 x 2 pooling window holds one inner pixel, so the max is 9 everywhere (2 x 2 map).
    # conv 2 on that 2 x 2 map sees all four pixels from each position: 36; pooling: one value, 36.
    assert out.tolist() == [[36.0, 2 * 36.0 + 0.5]]


@pytest.mark.parametrize("name", ["mlp-tanh", "mlp-relu"])
def test_mlp_784_200_200_10_has_199210_parameters(name):
    model = build_model(name, (1, 28, 28), 10, seed=0)
    assert count(model) == 199_210 == linear(784, 200) + linear(200, 200) + linear(200, 10)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    activation = nn.Tanh if name == "mlp-tanh" else nn.ReLU
    assert sum(isinstance(m, activation) for m in model.modules()) == 2
    wide = build_model(name, (3, 8, 8), 4, hidden=(7,))
    assert count(wide) == linear(192, 7) + linear(7, 4)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_small_shape_and_parameter_count(batchnorm):
    model = build_model("cnn-small", (1, 28, 28), 10, batchnorm=batchnorm)
    expected = conv3x3(1, 32, batchnorm) + conv3x3(32, 32, batchnorm) + linear(32 * 7 * 7, 10)
    assert count(model) == expected
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    cifar = build_model("cnn-small", (3, 32, 32), 10, batchnorm=batchnorm, width=8, activation="tanh")
    assert count(cifar) == conv3x3(3, 8, batchnorm) + conv3x3(8, 8, batchnorm) + linear(8 * 8 * 8, 10)
    assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("shape", "side"), [((3, 32, 32), 4), ((1, 28, 28), 3), ((1, 8, 8), 1)])
def test_cnn_deep_is_the_six_conv_shape_for_any_input(shape, side):
    model = build_model("cnn-deep", shape, 10, batchnorm=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    cin = shape[0]
    expected = conv3x3(cin, 32, False) + conv3x3(32, 32, False) + conv3x3(32, 64, False) + conv3x3(64, 64, False)
    expected += conv3x3(64, 128, False) + conv3x3(128, 128, False) + linear(128 * side * side, 10)
    assert count(model) == expected
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    with_bn = build_model("cnn-deep", shape, 10, hidden=(16,))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 6
    assert count(with_bn) == expected - linear(128 * side * side, 10) + 2 * (32 + 32 + 64 + 64 + 128 + 128) + linear(
        128 * side * side, 16
    ) + linear(16, 10)


def test_seed_gives_equal_weights_without_touching_the_global_rng():
    before = torch.random.get_rng_state()
    a = build_model("cnn-deep", (1, 8, 8), 10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("cnn-deep", (1, 8, 8), 10, seed=5)
    c = build_model("cnn-deep", (1, 8, 8), 10, seed=6)
    for (key, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), key
    assert not torch.equal(a[0].weight, c[0].weight)
    torch.manual_seed(1)
    d = build_model("mlp-relu", (1, 4, 4), 3)
    torch.manual_seed(1)
    e = build_model("mlp-relu", (1, 4, 4), 3)
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_dropout_and_no_in_place_activations(name):
    model = build_model(name, (1, 8, 8), 10)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_bad_names_options_and_shapes_are_value_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'; allowed: mlp-tanh, mlp-relu, cnn-small, cnn-deep"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"no option\(s\) \['dropout'\]; allowed: width, batchnorm, activation"):
        build_model("cnn-small", (1, 28, 28), 10, dropout=0.5)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        build_model("cnn-deep", (1, 4, 4), 10)
    with pytest.raises(ValueError, match="three positive integers"):
        build_model("mlp-tanh", (784,), 10)
    with pytest.raises(ValueError, match="hidden must be"):
        build_model("mlp-tanh", (1, 4, 4), 10, hidden=(0,))
    with pytest.raises(ValueError, match="activation must be one of"):
        build_model("cnn-small", (1, 8, 8), 10, activation="gelu")


CASES = [
    ("mlp-tanh", {"hidden": (5, 4)}, "eval"),
    ("mlp-relu", {"hidden": (6,)}, "eval"),
    ("cnn-small", {"width": 3}, "eval"),
    ("cnn-small", {"width": 3, "batchnorm": True, "activation": "tanh"}, "train"),
    ("cnn-small", {"width": 3, "batchnorm": True}, "eval"),
    ("cnn-deep", {"widths": (2, 3, 2), "hidden": (5,)}, "train"),
]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp setup
@pytest.mark.parametrize(("name", "options", "mode"), CASES)
def test_forward_over_reverse_hvp_equals_double_backward(name, options, mode):
    """torch.func's jvp-of-grad Hessian-vector product against autograd's double backward."""
    model = build_model(name, (2, 8, 8), 3, seed=0, **options).double()
    getattr(model, mode)()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (6,), generator=generator)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    vector = {k: torch.randn(p.shape, dtype=torch.float64, generator=generator) for k, p in params.items()}

    def loss(p):
        # Fresh buffer copies: BatchNorm in train mode updates running statistics in place.
        state = {**p, **{k: b.clone() for k, b in buffers.items()}}
        return nn.functional.cross_entropy(functional_call(model, state, (x,)), y)

    _, hvp = jvp(grad(loss), (params,), (vector,))

    weights = list(model.parameters())
    gradient = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), weights, create_graph=True)
    dot = sum((g * vector[k]).sum() for g, k in zip(gradient, params))
    reference = torch.autograd.grad(dot, weights)
    for key, ref in zip(params, reference):
        torch.testing.assert_close(hvp[key], ref, rtol=1e-9, atol=1e-12)


# -- the language model's LayerNorm: torch's function, derivatives of every order right --------------------

def tiny_language_model():
    """A one-block language model in float64, its parameters moved off the initial values (LayerNorm 1 and 0)."""
    from experiments.models import build_transformer

    model = build_transformer(vocab_size=7, context=5, n_layer=1, n_head=2, d_model=8, seed=1).double()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, dtype=torch.float64, generator=generator))
    tokens = torch.randint(0, 7, (2, 4, 5), generator=generator)
    return model, tokens[0], tokens[1]


def with_torch_layer_norms(model):
    """The same model with every LayerNorm replaced by torch's ``nn.LayerNorm`` holding the same weights."""
    import copy

    twin = copy.deepcopy(model)
    for module in twin.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                fused = nn.LayerNorm(child.normalized_shape, eps=child.eps).to(torch.float64)
                fused.load_state_dict(child.state_dict())
                setattr(module, name, fused)
    return twin


def test_the_language_models_layer_norm_is_torchs_function_with_its_state_dict_keys():
    from experiments.models.transformer import LayerNorm

    generator = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        ours, theirs = LayerNorm(6).to(dtype), nn.LayerNorm(6).to(dtype)
        with torch.no_grad():
            ours.weight.normal_(generator=generator), ours.bias.normal_(generator=generator)
        theirs.load_state_dict(ours.state_dict())
        x = (3 + 5 * torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)).to(dtype)
        assert ours(x).dtype == dtype
        torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)
    model, x, _ = tiny_language_model()
    old = with_torch_layer_norms(model)  # what a checkpoint written with nn.LayerNorm holds
    assert list(model.state_dict()) == list(old.state_dict())
    model.load_state_dict(old.state_dict())
    torch.testing.assert_close(model(x), old(x), rtol=1e-13, atol=1e-13)


def test_the_language_models_third_derivatives_equal_central_differences():
    """D^3 L[a, b, e] (the gradient of the sharpness needs it) against central differences of a^T H b.

    With torch's ``nn.LayerNorm`` the operator refuses the model, and reverse
    mode three times over through it is off by tens of percent (torch 2.13).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from eos_toolkit.hvp import hessian_operator
    from eos_toolkit.modes import KernelFallbackWarning
    from experiments.tasks.language import token_cross_entropy

    model, x, y = tiny_language_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(5)
    a, b, e = (torch.randn(theta.numel(), dtype=torch.float64, generator=generator) for _ in range(3))

    def loss_of(net):
        def loss(flat):
            params = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]),
                                                                      shapes))))
            return token_cross_entropy(functional_call(net, params, (x,)), y)
        return loss

    def central_difference(h=1e-3):  # of a^T H(theta + t e) b, Richardson-extrapolated
        def product(t):
            with sdpa_kernel([SDPBackend.MATH]):  # CPU flash attention has no double backward
                return float(torch.autograd.functional.vhp(loss_of(model), theta + t * e, b)[1] @ a)
        wide = (product(h) - product(-h)) / (2 * h)
        return (4 * (product(h / 2) - product(-h / 2)) / h - wide) / 3

    reference = central_difference()
    op = hessian_operator(model, token_cross_entropy, [(x, y)])
    with pytest.warns(KernelFallbackWarning, match="math attention"):
        third = op.third_derivative(a, b)
    assert float(third @ e) == pytest.approx(reference, rel=1e-6)

    fused = with_torch_layer_norms(model)
    with pytest.raises(ValueError, match="fused layer norm"):
        hessian_operator(fused, token_cross_entropy, [(x, y)]).third_derivative(a, b)
    flat = theta.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        g = torch.autograd.grad(loss_of(fused)(flat), flat, create_graph=True)[0]
        hb = torch.autograd.grad(g @ b, flat, create_graph=True)[0]
        through_torch = float(torch.autograd.grad(hb @ a, flat)[0] @ e)
    assert abs(through_torch - reference) > 0.05 * abs(reference)
