"""Triton kernels of the fused VRAdam step (imported only by ``vradam.fused_triton``).

The update kernels walk a *chunk table*: one int64 row of ``CHUNK_ROW_WIDTH``
(= 8, the ``pid * 8`` in the kernels) entries per chunk of at most ``chunk`` consecutive elements of one tensor::

    [param ptr, grad ptr, exp_avg ptr, exp_avg_sq ptr, start, stop, step ptr, 0]

so one launch covers any number of tensors.  ``start``/``stop`` are element
offsets inside the tensor; ``step ptr`` points at the tensor's float32 step
count (a zero-size tensor gets one row with start = stop = 0, so that its step
still advances).  Arithmetic is float32 whatever the storage dtype; the bias
corrections are formed in float64, because ``1 - beta2**t`` at small ``t`` is a
difference of nearly equal numbers.

The kernels (v = exp_avg, the velocity; m = exp_avg_sq, as in DESIGN.md):

``first_pass_kernel``   v <- b1 v + (1-b1) g;  m <- b2 m + (1-b2) g^2;
                        partial[chunk] = sum over the chunk of |v|^p (or |g|^p);
                        optionally t <- t + 1 (by the tensor's first chunk)
``reduce_norm_kernel``  s[group] = sum of the group's partials; s[G] = sum of all
``second_pass_kernel``  eta = lr / (1 + min(beta3 s, alpha1));
                        p <- p (1 - eta wd) - eta (v / bc1) / (sqrt(m / bc2) + eps)
``one_pass_kernel``     the lagged variant: the first and second pass fused, with
                        eta taken from the previous step's s.

A program walks its chunk in CHUNK / BLOCK tiles of BLOCK elements (a fixed
trip count; tiles past the chunk's end do nothing): whole tiles without a mask,
the one partial tile with a mask. Chunks start at multiples of BLOCK, so with
ALIGNED (every pointer of the launch 16-byte aligned) whole tiles compile to
vector loads and stores; a mask bounded by a value read from memory would force
one element per instruction.
"""

import torch
import triton
import triton.language as tl

CHUNK_ROW_WIDTH = 8
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _pointer(row, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer stored in ``row[column]``, typed as a pointer to DTYPE."""
    pointer = tl.load(row + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _tile_offsets(offset, BLOCK: tl.constexpr):
    """offset + [0, BLOCK), with offset a multiple of BLOCK."""
    return tl.max_contiguous(tl.multiple_of(offset + tl.arange(0, BLOCK), BLOCK), BLOCK)


@triton.jit
def _load(pointer, offs, stop, MASKED: tl.constexpr):
    """Elements at offs as float32; with MASKED, 0 at and beyond stop."""
    if MASKED:
        return tl.load(pointer + offs, mask=offs < stop, other=0.0).to(tl.float32)
    return tl.load(pointer + offs).to(tl.float32)


@triton.jit
def _store(pointer, offs, stop, value, MASKED: tl.constexpr):
    """Store value (cast to the pointer's dtype) at offs; with MASKED, only below stop."""
    value = value.to(pointer.dtype.element_ty)
    if MASKED:
        tl.store(pointer + offs, value, mask=offs < stop)
    else:
        tl.store(pointer + offs, value)


@triton.jit
def _gate_term(x, power, POWER_IS_TWO: tl.constexpr):
    """|x|^power elementwise (0 where x = 0)."""
    if POWER_IS_TWO:
        return x * x
    magnitude = tl.abs(x)
    positive = magnitude > 0.0
    safe = tl.where(positive, magnitude, 1.0)
    return tl.where(positive, tl.exp2(power * tl.log2(safe)), 0.0)


@triton.jit
def _update_moments(grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's two moment updates, in float32."""
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    return exp_avg, exp_avg_sq


@triton.jit
def _effective_rate(sq_norm, lr, beta3, alpha1, LR_IS_POINTER: tl.constexpr):
    """eta = lr / (1 + min(beta3 s, alpha1)) and whether the clamp alpha1 bites.

    ``lr`` is a number, or (LR_IS_POINTER) a pointer to a one-element tensor.
    """
    if LR_IS_POINTER:
        lr = tl.load(lr).to(tl.float32)
    gated = beta3 * sq_norm
    clamped = gated >= alpha1
    eta = lr / (1.0 + tl.minimum(gated, alpha1))
    return eta, clamped


@triton.jit
def _bias_corrections(row, has_elements, log_beta1, log_beta2):
    """(1 / (1 - b1^t), 1 / sqrt(1 - b2^t)) for the chunk's tensor, formed in float64.

    b^t = exp(t ln b); ``log_beta`` = -inf for b = 0 (t >= 1 always).
    """
    step_ptr = _pointer(row, 6, tl.float32, False)
    step = tl.load(step_ptr, mask=has_elements, other=1.0).to(tl.float64)
    correction1 = 1.0 - tl.exp(step * log_beta1)
    correction2 = 1.0 - tl.exp(step * log_beta2)
    return (1.0 / correction1).to(tl.float32), (1.0 / tl.sqrt(correction2)).to(tl.float32)


@triton.jit
def _apply_update(param, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                  inv_correction1, inv_sqrt_correction2):
    """Decoupled weight decay and the bias-corrected Adam direction at rate eta."""
    denom = tl.sqrt(exp_avg_sq) * inv_sqrt_correction2 + eps
    return param * (1.0 - eta * weight_decay) - (eta * inv_correction1) * exp_avg / denom


@triton.jit
def _moments_tile(grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, stop,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, power,
                  MAXIMIZE: tl.constexpr, GATE_IS_VELOCITY: tl.constexpr,
                  POWER_IS_TWO: tl.constexpr, MASKED: tl.constexpr):
    """Pass 1 on one tile: update and store both moments; (v, m, gate terms) in float32."""
    grad = _load(grad_ptr, offs, stop, MASKED)
    if MAXIMIZE:
        grad = -grad
    exp_avg, exp_avg_sq = _update_moments(
        grad, _load(exp_avg_ptr, offs, stop, MASKED), _load(exp_avg_sq_ptr, offs, stop, MASKED),
        beta1, one_minus_beta1, beta2, one_minus_beta2)
    _store(exp_avg_ptr, offs, stop, exp_avg, MASKED)
    _store(exp_avg_sq_ptr, offs, stop, exp_avg_sq, MASKED)
    if GATE_IS_VELOCITY:
        gate = _gate_term(exp_avg, power, POWER_IS_TWO)
    else:
        gate = _gate_term(grad, power, POWER_IS_TWO)
    return exp_avg, exp_avg_sq, gate


@triton.jit
def _update_tile(param_ptr, offs, stop, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                 inv_correction1, inv_sqrt_correction2, MASKED: tl.constexpr):
    """Pass 2 on one tile, given the tile's moments in float32."""
    param = _apply_update(_load(param_ptr, offs, stop, MASKED), exp_avg, exp_avg_sq, eta,
                          weight_decay, eps, inv_correction1, inv_sqrt_correction2)
    _store(param_ptr, offs, stop, param, MASKED)


@triton.jit
def first_pass_kernel(
    chunk_table, partial_norms, first_partial,
    beta1, one_minus_beta1, beta2, one_minus_beta2, power,
    GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, GATE_IS_VELOCITY: tl.constexpr, POWER_IS_TWO: tl.constexpr,
    INCREMENT_STEPS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Update both moments of one chunk; write the chunk's gate partial sum.

    With INCREMENT_STEPS the tensor's first chunk (start = 0) adds one to its
    step count; nothing in this kernel reads it, the second pass does.
    """
    pid = tl.program_id(0)
    row = chunk_table + pid * 8
    grad_ptr = _pointer(row, 1, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE, ALIGNED)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    if INCREMENT_STEPS:
        if start == 0:
            step_ptr = _pointer(row, 6, tl.float32, False)
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(0, CHUNK // BLOCK):
        offset = start + tile * BLOCK
        offs = _tile_offsets(offset, BLOCK)
        if offset + BLOCK <= stop:
            _, _, gate = _moments_tile(
                grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, stop,
                beta1, one_minus_beta1, beta2, one_minus_beta2, power,
                MAXIMIZE, GATE_IS_VELOCITY, POWER_IS_TWO, False)
            acc += gate
        elif offset < stop:
            _, _, gate = _moments_tile(
                grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, stop,
                beta1, one_minus_beta1, beta2, one_minus_beta2, power,
                MAXIMIZE, GATE_IS_VELOCITY, POWER_IS_TWO, True)
            acc += gate
    tl.store(partial_norms + first_partial + pid, tl.sum(acc, axis=0))


@triton.jit
def reduce_norm_kernel(partial_norms, group_bounds, sq_norms, num_groups, BLOCK: tl.constexpr):
    """One program: s[g] = sum(partials[bounds[g]:bounds[g+1]]), s[num_groups] = sum of all.

    While loops, because their bounds are read from memory (a ``range`` over
    such values trips older interpreters).
    """
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    group = 0
    while group < num_groups:
        lo = tl.load(group_bounds + group)
        hi = tl.load(group_bounds + group + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        offset = lo
        while offset < hi:
            offs = offset + tl.arange(0, BLOCK)
            acc += tl.load(partial_norms + offs, mask=offs < hi, other=0.0)
            offset += BLOCK
        tl.store(sq_norms + group, tl.sum(acc, axis=0))
        total += acc
        group += 1
    tl.store(sq_norms + num_groups, tl.sum(total, axis=0))


@triton.jit
def second_pass_kernel(
    chunk_table, sq_norms, norm_slot,
    eta_out, clamped_out, telemetry_slot,
    lr, beta3, alpha1, log_beta1, log_beta2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, LR_IS_POINTER: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Apply the update of one chunk at the rate gated by s[norm_slot].

    Program 0 writes eta and the clamp flag to ``*_out[telemetry_slot]`` when
    ``telemetry_slot >= 0``.
    """
    pid = tl.program_id(0)
    sq_norm = tl.load(sq_norms + norm_slot)
    eta, clamped = _effective_rate(sq_norm, lr, beta3, alpha1, LR_IS_POINTER)
    if pid == 0:
        if telemetry_slot >= 0:
            tl.store(eta_out + telemetry_slot, eta)
            tl.store(clamped_out + telemetry_slot, clamped)
    row = chunk_table + pid * 8
    param_ptr = _pointer(row, 0, PARAM_DTYPE, ALIGNED)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE, ALIGNED)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    inv_correction1, inv_sqrt_correction2 = _bias_corrections(
        row, start < stop, log_beta1, log_beta2)
    for tile in range(0, CHUNK // BLOCK):
        offset = start + tile * BLOCK
        offs = _tile_offsets(offset, BLOCK)
        if offset + BLOCK <= stop:
            _update_tile(param_ptr, offs, stop, _load(exp_avg_ptr, offs, stop, False),
                         _load(exp_avg_sq_ptr, offs, stop, False), eta, weight_decay, eps,
                         inv_correction1, inv_sqrt_correction2, False)
        elif offset < stop:
            _update_tile(param_ptr, offs, stop, _load(exp_avg_ptr, offs, stop, True),
                         _load(exp_avg_sq_ptr, offs, stop, True), eta, weight_decay, eps,
                         inv_correction1, inv_sqrt_correction2, True)


@triton.jit
def one_pass_kernel(
    chunk_table, previous_sq_norm, partial_norms, first_partial,
    eta_out, clamped_out, telemetry_slot,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, alpha1,
    log_beta1, log_beta2, eps, weight_decay, power,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, GATE_IS_VELOCITY: tl.constexpr, POWER_IS_TWO: tl.constexpr,
    LR_IS_POINTER: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The lagged variant: moments, this step's gate partial and the update in one
    read of (p, g, v, m), with eta gated by the previous step's norm.

    The step counts must already be advanced: chunks of one tensor run in
    parallel, so none of them may write the count the others read.
    """
    pid = tl.program_id(0)
    eta, clamped = _effective_rate(tl.load(previous_sq_norm), lr, beta3, alpha1, LR_IS_POINTER)
    if pid == 0:
        if telemetry_slot >= 0:
            tl.store(eta_out + telemetry_slot, eta)
            tl.store(clamped_out + telemetry_slot, clamped)
    row = chunk_table + pid * 8
    param_ptr = _pointer(row, 0, PARAM_DTYPE, ALIGNED)
    grad_ptr = _pointer(row, 1, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE, ALIGNED)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    inv_correction1, inv_sqrt_correction2 = _bias_corrections(
        row, start < stop, log_beta1, log_beta2)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(0, CHUNK // BLOCK):
        offset = start + tile * BLOCK
        offs = _tile_offsets(offset, BLOCK)
        if offset + BLOCK <= stop:
            exp_avg, exp_avg_sq, gate = _moments_tile(
                grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, stop,
                beta1, one_minus_beta1, beta2, one_minus_beta2, power,
                MAXIMIZE, GATE_IS_VELOCITY, POWER_IS_TWO, False)
            acc += gate
            _update_tile(param_ptr, offs, stop, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                         inv_correction1, inv_sqrt_correction2, False)
        elif offset < stop:
            exp_avg, exp_avg_sq, gate = _moments_tile(
                grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, stop,
                beta1, one_minus_beta1, beta2, one_minus_beta2, power,
                MAXIMIZE, GATE_IS_VELOCITY, POWER_IS_TWO, True)
            acc += gate
            _update_tile(param_ptr, offs, stop, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                         inv_correction1, inv_sqrt_correction2, True)
    tl.store(partial_norms + first_partial + pid, tl.sum(acc, axis=0))


# Triton swaps ``triton.jit`` for its interpreter when TRITON_INTERPRET=1 at import.
INTERPRETED = not isinstance(first_pass_kernel, triton.runtime.JITFunction)
