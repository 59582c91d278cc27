"""Triton kernels of the fused VRAdam step (imported only by ``vradam.fused_triton``).

Every kernel walks a *chunk table*: one int64 row of ``CHUNK_ROW_WIDTH``
entries per chunk of at most ``chunk`` consecutive elements of one tensor::

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
"""

import triton
import triton.language as tl

CHUNK_ROW_WIDTH = 8


@triton.jit
def _pointer(row, column, DTYPE: tl.constexpr):
    """The pointer stored in ``row[column]``, typed as a pointer to DTYPE."""
    return tl.load(row + column).to(tl.pointer_type(DTYPE))


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
    step_ptr = _pointer(row, 6, tl.float32)
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
def first_pass_kernel(
    chunk_table, partial_norms, first_partial,
    beta1, one_minus_beta1, beta2, one_minus_beta2, power,
    GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, GATE_IS_VELOCITY: tl.constexpr, POWER_IS_TWO: tl.constexpr,
    INCREMENT_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Update both moments of one chunk; write the chunk's gate partial sum.

    With INCREMENT_STEPS the tensor's first chunk (start = 0) adds one to its
    step count; nothing in this kernel reads it, the second pass does.
    """
    pid = tl.program_id(0)
    row = chunk_table + pid * 8
    grad_ptr = _pointer(row, 1, GRAD_DTYPE)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    if INCREMENT_STEPS:
        if start == 0:
            step_ptr = _pointer(row, 6, tl.float32)
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(start, stop, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        mask = offs < stop
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            grad = -grad
        exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg, exp_avg_sq = _update_moments(
            grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2)
        tl.store(exp_avg_ptr + offs, exp_avg.to(MOMENT_DTYPE), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, exp_avg_sq.to(MOMENT_DTYPE), mask=mask)
        if GATE_IS_VELOCITY:
            acc += _gate_term(exp_avg, power, POWER_IS_TWO)
        else:
            acc += _gate_term(grad, power, POWER_IS_TWO)
    tl.store(partial_norms + first_partial + pid, tl.sum(acc, axis=0))


@triton.jit
def reduce_norm_kernel(partial_norms, group_bounds, sq_norms, num_groups, BLOCK: tl.constexpr):
    """One program: s[g] = sum(partials[bounds[g]:bounds[g+1]]), s[num_groups] = sum of all."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for group in range(0, num_groups):
        lo = tl.load(group_bounds + group)
        hi = tl.load(group_bounds + group + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for offset in range(lo, hi, BLOCK):
            offs = offset + tl.arange(0, BLOCK)
            acc += tl.load(partial_norms + offs, mask=offs < hi, other=0.0)
        tl.store(sq_norms + group, tl.sum(acc, axis=0))
        total += acc
    tl.store(sq_norms + num_groups, tl.sum(total, axis=0))


@triton.jit
def second_pass_kernel(
    chunk_table, sq_norms, norm_slot,
    eta_out, clamped_out, telemetry_slot,
    lr, beta3, alpha1, log_beta1, log_beta2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, LR_IS_POINTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Apply the update of one chunk at the rate gated by s[norm_slot].

    Program 0 writes eta and the clamp flag to ``*_out[telemetry_slot]`` when
    ``telemetry_slot >= 0``.
    """
    pid = tl.program_id(0)
    eta, clamped = _effective_rate(tl.load(sq_norms + norm_slot), lr, beta3, alpha1, LR_IS_POINTER)
    if pid == 0:
        if telemetry_slot >= 0:
            tl.store(eta_out + telemetry_slot, eta)
            tl.store(clamped_out + telemetry_slot, clamped)
    row = chunk_table + pid * 8
    param_ptr = _pointer(row, 0, PARAM_DTYPE)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    inv_correction1, inv_sqrt_correction2 = _bias_corrections(
        row, start < stop, log_beta1, log_beta2)
    for offset in range(start, stop, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        mask = offs < stop
        param = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        param = _apply_update(param, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                              inv_correction1, inv_sqrt_correction2)
        tl.store(param_ptr + offs, param.to(PARAM_DTYPE), mask=mask)


@triton.jit
def one_pass_kernel(
    chunk_table, previous_sq_norm, partial_norms, first_partial,
    eta_out, clamped_out, telemetry_slot,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, alpha1,
    log_beta1, log_beta2, eps, weight_decay, power,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, GATE_IS_VELOCITY: tl.constexpr, POWER_IS_TWO: tl.constexpr,
    LR_IS_POINTER: tl.constexpr, BLOCK: tl.constexpr,
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
    param_ptr = _pointer(row, 0, PARAM_DTYPE)
    grad_ptr = _pointer(row, 1, GRAD_DTYPE)
    exp_avg_ptr = _pointer(row, 2, MOMENT_DTYPE)
    exp_avg_sq_ptr = _pointer(row, 3, MOMENT_DTYPE)
    start = tl.load(row + 4)
    stop = tl.load(row + 5)
    inv_correction1, inv_sqrt_correction2 = _bias_corrections(
        row, start < stop, log_beta1, log_beta2)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(start, stop, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        mask = offs < stop
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            grad = -grad
        exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        exp_avg, exp_avg_sq = _update_moments(
            grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2)
        tl.store(exp_avg_ptr + offs, exp_avg.to(MOMENT_DTYPE), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, exp_avg_sq.to(MOMENT_DTYPE), mask=mask)
        if GATE_IS_VELOCITY:
            acc += _gate_term(exp_avg, power, POWER_IS_TWO)
        else:
            acc += _gate_term(grad, power, POWER_IS_TWO)
        param = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        param = _apply_update(param, exp_avg, exp_avg_sq, eta, weight_decay, eps,
                              inv_correction1, inv_sqrt_correction2)
        tl.store(param_ptr + offs, param.to(PARAM_DTYPE), mask=mask)
    tl.store(partial_norms + first_partial + pid, tl.sum(acc, axis=0))
