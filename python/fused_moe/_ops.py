"""Typed wrappers over ``torch.ops.fused_moe`` and the fake kernels that let
``torch.compile`` trace them. The schemas live in ``csrc/registration.cpp``."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.fused_moe)

_ops = torch.ops.fused_moe


def topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int = 0,
    topk_group: int = 0,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing -> (weights f32 [M, K], ids int32 [M, K]); see fused_topk."""
    return _ops.topk(gating_output, topk, renormalize, scoring_func, e_score_correction_bias,
                     num_expert_group, topk_group, routed_scaling_factor)


def permute(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    num_local_experts: int,
    expert_map: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of every (token, slot) sorted by local expert, stably.

    Returns (rows [M*K, H], expert_offsets int32 [E_local + 1], inv_index int32
    [M, K]). Slots whose expert is not local (expert_map -1) get inv_index -1
    and zero rows after expert_offsets[-1]. ``row_weights`` [M, K] scales each
    gathered row (router weight applied on the input).
    """
    return _ops.permute(hidden_states, topk_ids, num_local_experts, expert_map, row_weights)


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    out_dtype: torch.dtype | None = None,
    w_zp: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[r] = w[e] @ a[r] (+ bias[e]) for rows r of expert e; w is [E, N, K].

    FP8 (a and w float8_e4m3fn): a = q * a_scale with a_scale [R, ceil(K/bk)]
    (per row per bk columns, needs block_shape), [R, 1] (per row) or [1, 1];
    w = q * w_scale with w_scale [E, ceil(N/bn), ceil(K/bk)] when block_shape
    = (bn, bk), else [E, N] (per channel) or [E] (per tensor). ``out_dtype``
    (default bfloat16) is the output's; bias is in it.

    4-bit w (uint8 [E, N, K/2], two codes a byte, the even k in the low
    nibble; a bf16/fp16/fp32 [R, K]): mxfp4 when w_scale is e8m0 (uint8 or
    float8_e8m0fnu) [E, N, K/32], w = e2m1(code) * 2^(s - 127); int4 when
    w_scale is bf16/fp16/fp32 [E, N, K/g], w = (code - zero) * s, zero from
    ``w_zp`` (uint8 [E, N, K/g]) or 8. See ``fused_moe.quant``.
    """
    return _ops.grouped_gemm(a, w, expert_offsets, bias, a_scale, w_scale,
                             None if block_shape is None else list(block_shape), out_dtype, w_zp)


def quantize_fp8(
    x: torch.Tensor, group_size: int = 0, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [R, K] -> (float8_e4m3fn [R, K], fp32 scales), x = q * scale.

    Dynamic: group_size > 0 one scale per row per group_size columns ([R,
    ceil(K/group_size)]); 0 one per row ([R, 1]); -1 one for the tensor ([1,
    1]); each ``max(amax, 1e-10) / 448``. Static: ``scale`` (one element)
    given, returned as [1, 1]. q = saturate(x / scale) to +-448.
    """
    return _ops.quantize_fp8(x, group_size, scale)


def activation(x: torch.Tensor, activation: str = "silu", is_act_and_mul: bool = True) -> torch.Tensor:
    """act(gate) * up on [R, 2I] (or act(x) on [R, I] when not is_act_and_mul)."""
    return _ops.activation(x, activation, is_act_and_mul)


def unpermute(
    y: torch.Tensor, inv_index: torch.Tensor, topk_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * y[inv_index[t, k]] (index -1 adds nothing)."""
    return _ops.unpermute(y, inv_index, topk_weights)


# --- fake kernels: output shapes and dtypes only ------------------------------------


@torch.library.register_fake("fused_moe::topk")
def _topk_fake(gating_output, topk, renormalize, scoring_func, bias, groups, topk_group, scale):
    shape = (gating_output.shape[0], topk)
    return (gating_output.new_empty(shape, dtype=torch.float32),
            gating_output.new_empty(shape, dtype=torch.int32))


@torch.library.register_fake("fused_moe::permute")
def _permute_fake(hidden_states, topk_ids, num_local_experts, expert_map, row_weights):
    m, h = hidden_states.shape
    k = topk_ids.shape[1]
    return (hidden_states.new_empty((m * k, h)),
            hidden_states.new_empty((num_local_experts + 1,), dtype=torch.int32),
            hidden_states.new_empty((m, k), dtype=torch.int32))


@torch.library.register_fake("fused_moe::grouped_gemm")
def _grouped_gemm_fake(a, w, expert_offsets, bias, a_scale=None, w_scale=None, block_shape=None,
                       out_dtype=None, w_zp=None):
    if a.dtype == torch.float8_e4m3fn:
        dtype = out_dtype or torch.bfloat16
    else:
        dtype = a.dtype
    return a.new_empty((a.shape[0], w.shape[1]), dtype=dtype)


@torch.library.register_fake("fused_moe::quantize_fp8")
def _quantize_fp8_fake(x, group_size, scale=None):
    rows, cols = x.shape
    if scale is not None or group_size < 0:
        shape = (1, 1)
    elif group_size == 0:
        shape = (rows, 1)
    else:
        shape = (rows, -(-cols // group_size))
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("fused_moe::activation")
def _activation_fake(x, activation, is_act_and_mul):
    cols = x.shape[1] // 2 if is_act_and_mul else x.shape[1]
    return x.new_empty((x.shape[0], cols))


@torch.library.register_fake("fused_moe::unpermute")
def _unpermute_fake(y, inv_index, topk_weights):
    return y.new_empty((inv_index.shape[0], y.shape[1]))


@torch.library.register_fake("fused_moe::fused_experts")
def _fused_experts_fake(hidden_states, w13, w2, topk_weights, topk_ids, *args):
    return hidden_states.new_empty(hidden_states.shape)
