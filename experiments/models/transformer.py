"""A decoder-only causal Transformer language model, written plainly.

``tokens (B, T) -> logits (B, T, vocab)``:

    x = token_embedding(tokens) + position_embedding(0..T-1)
    for each block:  x = x + attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))
    logits = read_out(LayerNorm(x))

- attention: multi-head causal self-attention through
  ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``
  (position t attends to positions <= t); ``n_head`` heads of
  ``d_model / n_head`` dimensions, one fused q/k/v projection and an output
  projection;
- MLP: ``Linear(d, 4d) -> GELU -> Linear(4d, d)``;
- pre-LayerNorm blocks and a final LayerNorm (GPT-2's arrangement), the
  LayerNorm written in plain tensor operations (:class:`LayerNorm`: torch's
  fused layer norm has wrong third derivatives, which the gradient of the
  sharpness needs);
- the read-out shares the token embedding's matrix (``tie_weights=True``,
  the default) or has its own, without bias;
- dropout (default 0) after the embeddings, on the attention weights and after
  each residual branch; the curvature engine evaluates with dropout off.

Initialisation as GPT-2: normal(0, 0.02) weights, zero biases, and the
projections that write into the residual stream scaled by 1/sqrt(2 n_layer).
With ``seed`` the weights come from a forked RNG (the global one untouched).

Example:
    >>> import torch
    >>> model = build_transformer(vocab_size=50, context=16, n_layer=2, n_head=2, d_model=32, seed=0)
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 50])
    >>> sum(p.numel() for p in model.parameters())   # tied read-out: the 50 x 32 matrix counted once
    27584
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OPTIONS = ("n_layer", "n_head", "d_model", "dropout", "tie_weights")


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in plain tensor operations, so that its derivatives of every order are right.

    Over the last ``len(normalized_shape)`` dimensions::

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (var: the biased variance)

    the same function, parameters and ``state_dict`` keys as ``nn.LayerNorm``
    (float16 and bfloat16 inputs are normalised in float32, as torch's kernel
    does).  torch 2.13's fused ``layer_norm`` has right first and second
    derivatives but wrong third ones: its double backward treats the saved
    mean and 1/std as constants.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        centred = h - h.mean(dims, keepdim=True)
        y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t (``causal=False`` only for tests)."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.causal = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention then MLP, each on a residual branch."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalTransformer(nn.Module):
    """Token and learned position embeddings, ``n_layer`` blocks, final LayerNorm, read-out (module docstring)."""

    def __init__(self, vocab_size: int, context: int, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
                 dropout: float = 0.0, tie_weights: bool = True):
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = LayerNorm(d_model)
        self.read_out = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.read_out.weight = self.token_embedding.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:  # branches that write into the residual stream
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[-1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.context}")
        positions = torch.arange(T, device=tokens.device)
        x = self.drop(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.read_out(self.ln_f(x))


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"transformer option {name}={value!r} is not allowed; {name} must be {allowed}")


def build_transformer(vocab_size: int, context: int, *, seed: int | None = None, n_layer: int = 2,
                      n_head: int = 4, d_model: int = 128, dropout: float = 0.0,
                      tie_weights: bool = True) -> CausalTransformer:
    """A :class:`CausalTransformer`; options checked with errors that name the bad value."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    _check("vocab_size", vocab_size, is_int(vocab_size) and vocab_size >= 2, "an integer >= 2")
    _check("context", context, is_int(context) and context >= 1, "an integer >= 1")
    _check("n_layer", n_layer, is_int(n_layer) and n_layer >= 1, "an integer >= 1")
    _check("n_head", n_head, is_int(n_head) and n_head >= 1, "an integer >= 1")
    _check("d_model", d_model, is_int(d_model) and d_model >= 1 and d_model % n_head == 0,
           f"a positive integer divisible by n_head={n_head}")
    _check("dropout", dropout, isinstance(dropout, (int, float)) and 0 <= dropout < 1, "in [0, 1)")
    _check("tie_weights", tie_weights, isinstance(tie_weights, bool), "true or false")
    args = (vocab_size, context, n_layer, n_head, d_model, float(dropout), tie_weights)
    if seed is None:
        return CausalTransformer(*args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalTransformer(*args)
