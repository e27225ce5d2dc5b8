"""Pure-PyTorch float64 reference of every op: the oracle of the tests.

Written for clarity, not speed, and independently of the kernels: no code is
shared with them. Every function accepts tensors on any device and returns
float64 results (ids and indices as int32), but for quantize_fp8, which returns
what the op returns.

FP8 (e4m3fn) follows the contract of the ops: a scale is ``max(amax, 1e-10) /
448`` of the values it covers, ``q = saturate(x / scale)``, ``x ~ q * scale``.
Quantized GEMMs dequantize both operands and multiply in float64.

4-bit weights (uint8 [E, N, K/2], two codes a byte, the even k in the low
nibble) are dequantized by ``dequantize_4bit``, written from the contract's
table: mxfp4 (e8m0 scales) e2m1(code) * 2^(s - 127), s = 255 NaN; int4
(float scales) (code - zero) * scale, zero 8 without zero points."""

from __future__ import annotations

import math

import torch


def _rank(values: torch.Tensor) -> torch.Tensor:
    """Indices of ``values`` [..., n] best first: larger first, NaN last, ties
    to the lower index (two stable sorts)."""
    order = torch.sort(torch.nan_to_num(values, nan=-math.inf), dim=-1, descending=True,
                       stable=True).indices
    isnan = torch.gather(values.isnan(), -1, order).to(torch.int8)
    return torch.gather(order, -1, torch.sort(isnan, dim=-1, stable=True).indices)


def fused_topk(gating_output, topk, *, renormalize=True, scoring_func="softmax",
               e_score_correction_bias=None, num_expert_group=None, topk_group=None,
               routed_scaling_factor=1.0):
    logits = gating_output.double()
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    choice = scores.clone()
    if e_score_correction_bias is not None:
        choice = choice + e_score_correction_bias.double()
    if num_expert_group:
        m, e = choice.shape
        groups = choice.view(m, num_expert_group, e // num_expert_group)
        ranked = torch.gather(groups, -1, _rank(groups))
        if e_score_correction_bias is not None and groups.shape[-1] > 1:
            group_score = ranked[..., 0] + ranked[..., 1]
        else:
            group_score = ranked[..., 0]
        kept = _rank(group_score)[:, :topk_group]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        mask = keep.repeat_interleave(e // num_expert_group, dim=1)
        ids = _rank(choice)
        # Experts of dropped groups are never chosen: move them behind the kept ones.
        kept_first = torch.sort((~mask.gather(1, ids)).to(torch.int8), dim=1, stable=True).indices
        ids = ids.gather(1, kept_first)[:, :topk]
    else:
        ids = _rank(choice)[:, :topk]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def _local_ids(topk_ids, num_local_experts, expert_map):
    ids = topk_ids.long()
    if expert_map is None:
        return torch.where((ids >= 0) & (ids < num_local_experts), ids, -1)
    valid = (ids >= 0) & (ids < expert_map.numel())
    return torch.where(valid, expert_map.long()[ids.clamp(0, expert_map.numel() - 1)], -1)


def permute(hidden_states, topk_ids, num_local_experts, expert_map=None, row_weights=None):
    m, k = topk_ids.shape
    local = _local_ids(topk_ids, num_local_experts, expert_map).flatten()
    key = torch.where(local >= 0, local, num_local_experts)
    order = torch.sort(key, stable=True).indices  # slot of each output row
    x = hidden_states.double()
    if row_weights is not None:
        rows = x[order // k] * row_weights.double().flatten()[order, None]
    else:
        rows = x[order // k]
    rows[key[order] == num_local_experts] = 0
    counts = torch.bincount(local[local >= 0], minlength=num_local_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    inv = torch.empty(m * k, dtype=torch.long, device=topk_ids.device)
    inv[order] = torch.arange(m * k, device=topk_ids.device)
    inv = torch.where(local >= 0, inv, -1)
    return rows, offsets, inv.view(m, k).to(torch.int32)


_E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-10


def _scale_of(amax):
    """max(amax, 1e-10) / 448 in fp32, a true division on every device (torch
    on CUDA multiplies by the reciprocal of a Python scalar divisor)."""
    amax = torch.clamp(amax, min=_AMAX_FLOOR)
    return amax / torch.full_like(amax, _E4M3_MAX)


def quantize_fp8(x, group_size=0, scale=None):
    """Rows [R, K] -> (float8_e4m3fn q [R, K], float32 scales), the op's
    semantics: group_size > 0 one scale per row per group_size columns ([R,
    ceil(K/group_size)], a partial last group takes what it holds); 0 one per
    row ([R, 1]); -1 one for the tensor ([1, 1]); ``scale`` (one element)
    given: static, returned as [1, 1]. The scale and the division are fp32,
    as the contract defines them, so q is the op's to the bit."""
    x = x.float()
    rows, cols = x.shape
    if scale is not None:
        scales = scale.float().reshape(1, 1)
        full = scales.expand(rows, cols)
    elif group_size == -1:
        amax = x.abs().amax() if x.numel() else x.new_zeros(())
        scales = _scale_of(amax).reshape(1, 1)
        full = scales.expand(rows, cols)
    else:
        group = group_size if group_size > 0 else max(cols, 1)
        groups = math.ceil(cols / group)
        padded = torch.nn.functional.pad(x.abs(), (0, groups * group - cols))
        amax = padded.view(rows, groups, group).amax(dim=-1)
        scales = _scale_of(amax)
        full = scales.repeat_interleave(group, dim=1)[:, :cols]
    q = torch.clamp(x / full, -_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scales


def _per_element(scale, shape, block_shape=None):
    """Weight scales broadcast over weights [E, N, K] in float64: block
    [E, ceil(N/bn), ceil(K/bk)], channel [E, N] or tensor [E]."""
    e, n, k = shape
    s = scale.double()
    if block_shape is not None:
        bn, bk = block_shape
        return s.repeat_interleave(bn, dim=1)[:, :n].repeat_interleave(bk, dim=2)[:, :, :k]
    if s.numel() == e:
        return s.reshape(e, 1, 1).expand(e, n, k)
    return s.reshape(e, n, 1).expand(e, n, k)


def dequantize(w, scale, block_shape=None):
    """FP8 weights [E, N, K] with their scales -> float64."""
    return w.double() * _per_element(scale, w.shape, block_shape)


# e2m1 by code: sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def unpack_4bit(w):
    """uint8 [..., K/2] -> codes int64 [..., K]: code k = (byte[k/2] >> 4*(k%2)) & 15."""
    w = w.long()
    return torch.stack([w & 15, w >> 4], dim=-1).flatten(-2)


def dequantize_4bit(w, scale, zero_point=None):
    """4-bit weights [E, N, K/2] with scales [E, N, K/g] (e8m0 bytes: mxfp4;
    floats: int4, zero points uint8 [E, N, K/g] or 8) -> float64 [E, N, K]."""
    codes = unpack_4bit(w)
    group = codes.shape[-1] // scale.shape[-1]
    per_k = lambda t: t.repeat_interleave(group, dim=-1)  # noqa: E731
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        exponent = scale.view(torch.uint8).double()
        s = torch.where(exponent == 255, math.nan, torch.pow(2.0, exponent - 127))
        values = torch.tensor(_E2M1, dtype=torch.float64, device=w.device)[codes]
        return values * per_k(s)
    zero = 8.0 if zero_point is None else per_k(zero_point.double())
    return (codes.double() - zero) * per_k(scale.double())


def _dequantize_rows(q, scales, block_k=None):
    """Activations q [R, K] times their scales [R, groups] ([R, 1], [1, 1])."""
    s = scales.double()
    if s.shape[1] > 1:
        s = s.repeat_interleave(block_k, dim=1)[:, :q.shape[1]]
    return q.double() * s


def grouped_gemm(a, w, expert_offsets, bias=None, a_scale=None, w_scale=None, block_shape=None,
                 w_zp=None):
    """out[r] = w[e] @ a[r] (+ bias[e]); FP8 operands are dequantized by
    a_scale ([R, ceil(K/bk)], [R, 1] or [1, 1]) and w_scale first, 4-bit
    (uint8) w by w_scale and w_zp."""
    a = a.double() if a_scale is None else _dequantize_rows(
        a, a_scale, None if block_shape is None else block_shape[1])
    if w.dtype == torch.uint8:
        w = dequantize_4bit(w, w_scale, w_zp)
    else:
        w = w.double() if w_scale is None else dequantize(w, w_scale, block_shape)
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64, device=a.device)
    off = expert_offsets.tolist()
    for e in range(w.shape[0]):
        rows = slice(off[e], off[e + 1])
        out[rows] = a[rows] @ w[e].T
        if bias is not None:
            out[rows] += bias[e].double()
    return out


def _act(x, activation):
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "relu2":
        return torch.relu(x) ** 2
    raise ValueError(f"unknown activation {activation!r}")


def _swigluoai(gate, up, alpha=1.702, limit=7.0):
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def activation(x, activation, is_act_and_mul=True):
    x = x.double()
    if not is_act_and_mul:
        return _act(x, activation)
    if activation == "swigluoai":
        return _swigluoai(x[:, 0::2], x[:, 1::2])
    gate, up = x.chunk(2, dim=-1)
    return _act(gate, activation) * up


_activation = activation


def unpermute(y, inv_index, topk_weights=None):
    inv = inv_index.long()
    rows = y.double()[inv.clamp(min=0)]  # [M, K, H]
    w = torch.ones(inv.shape, dtype=torch.float64, device=y.device)
    if topk_weights is not None:
        w = topk_weights.double()
    w = torch.where(inv >= 0, w, 0.0)
    return (rows * w[..., None]).sum(dim=1)


def _fake_quantize(x, group_size, scale):
    """x quantized and dequantized again, as the kernels see activations."""
    q, scales = quantize_fp8(x, group_size, scale)
    return _dequantize_rows(q, scales, group_size if group_size > 0 else None)


def _activation_quantizer(block_shape, per_act_token_quant, static_scale):
    """The function that quantizes-dequantizes one GEMM's input [R, K], per
    the scheme: per token per bk columns (block), per token, static, or one
    scale for the tensor."""
    if block_shape is not None:
        return lambda t: _fake_quantize(t, block_shape[1], None)
    if per_act_token_quant:
        return lambda t: _fake_quantize(t, 0, None)
    if static_scale is not None:
        return lambda t: _fake_quantize(t, 0, static_scale)
    return lambda t: _fake_quantize(t, -1, None)


def fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *, activation="silu",
                  is_act_and_mul=True, w13_bias=None, w2_bias=None, expert_map=None,
                  global_num_experts=None, apply_router_weight_on_input=False,
                  intermediate_dtype=None, w13_scale=None, w2_scale=None, a13_scale=None,
                  a2_scale=None, block_shape=None, per_act_token_quant=False, w13_zp=None,
                  w2_zp=None):
    """Loops over experts: each token's slots on expert e, computed directly from
    the formula in DESIGN.md (no permute).

    ``intermediate_dtype`` rounds the first GEMM's output, the activation and
    the second GEMM's output to that dtype, where the kernels store them: a
    sum that cancels (tiny H and I) then compares bit-level noise to noise.

    FP8 weights (``w13_scale``, ``w2_scale`` given; shapes as
    ``grouped_gemm``'s w_scale) are dequantized, and the two GEMM inputs are
    quantized and dequantized as the scheme says: x (after the router weight
    with ``apply_router_weight_on_input``) and the activation output, per
    token per bk columns with ``block_shape``, else per token with
    ``per_act_token_quant``, else with the static ``a13_scale``/``a2_scale``
    when given, else with one scale over all of them. The intermediates are
    then rounded to ``intermediate_dtype``, x's dtype unless given.

    4-bit weights (uint8, scales ``w13_scale``/``w2_scale``, zero points
    ``w13_zp``/``w2_zp``) are dequantized; activations are not quantized
    (weight-only) and the intermediates are rounded as for FP8."""
    packed4 = w13.dtype == torch.uint8
    quantized = w13_scale is not None and not packed4
    x = hidden_states.double()
    if packed4:
        intermediate_dtype = intermediate_dtype or hidden_states.dtype
        w13 = dequantize_4bit(w13, w13_scale, w13_zp)
        w2 = dequantize_4bit(w2, w2_scale, w2_zp)
    if quantized:
        intermediate_dtype = intermediate_dtype or hidden_states.dtype
        w13 = dequantize(w13, w13_scale, block_shape)
        w2 = dequantize(w2, w2_scale, block_shape)
    rounded = (lambda t: t.to(intermediate_dtype).double()) if intermediate_dtype else (lambda t: t)
    keep = lambda t: t  # noqa: E731  (unquantized GEMM inputs are used as they are)
    quant13 = _activation_quantizer(block_shape, per_act_token_quant, a13_scale) \
        if quantized else keep
    quant2 = _activation_quantizer(block_shape, per_act_token_quant, a2_scale) \
        if quantized else keep
    local = _local_ids(topk_ids, w13.shape[0], expert_map)
    weights = topk_weights.double()
    tok, slot = torch.nonzero(local >= 0, as_tuple=True)  # every local slot, token order
    experts = local[tok, slot]
    w = weights[tok, slot][:, None]
    if apply_router_weight_on_input:  # top-1: one weight per token
        x = x * weights[:, :1]
    # A per-tensor scale covers what the kernels quantize as one tensor: x of
    # every token, the activation output of every local slot.
    xs = quant13(x.float() if quantized else x)[tok]
    h = torch.zeros(xs.shape[0], w13.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w13.shape[0]):
        rows = experts == e
        h[rows] = xs[rows] @ w13[e].double().T
        if w13_bias is not None:
            h[rows] += w13_bias[e].double()
    a = rounded(_activation(rounded(h), activation, is_act_and_mul))
    a = quant2(a.float() if quantized else a)
    y = torch.zeros(a.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w2.shape[0]):
        rows = experts == e
        y[rows] = a[rows] @ w2[e].double().T
        if w2_bias is not None:
            y[rows] += w2_bias[e].double()
    y = rounded(y)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, y if apply_router_weight_on_input else y * w)
    return out
