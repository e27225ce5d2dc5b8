"""fused_experts: the whole expert computation of an MoE layer, as one op."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers the ops)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swigluoai")


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    is_act_and_mul: bool = True,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    global_num_experts: int | None = None,
    apply_router_weight_on_input: bool = False,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    per_act_token_quant: bool = False,
    w13_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * (W2_e act(W13_e x_t + b13_e) + b2_e)``, e = topk_ids[t,k].

    hidden_states [M, H]; w13 [E_local, 2I, H] (gate rows then up rows;
    interleaved gate/up for ``swigluoai``) or [E_local, I, H] when not
    ``is_act_and_mul``; w2 [E_local, H, I]; topk_weights float32 [M, K];
    topk_ids int32 [M, K] of global expert ids. ``expert_map`` [E_global]
    int32 maps global ids to local ones, -1 for experts on other ranks, whose
    slots add nothing. ``apply_router_weight_on_input`` (top-1 only) scales x
    instead of the output. Accumulates in fp32; returns [M, H] in x's dtype.

    FP8 experts (w13, w2 float8_e4m3fn, x bf16/fp16; see ``fused_moe.quant``):
    ``w13_scale``, ``w2_scale`` fp32 weight scales, ``w = q * scale``: with
    ``block_shape`` (bn, bk) [E, ceil(N/bn), ceil(K/bk)] and activations
    quantized per token per bk columns; else per channel [E, N] or per tensor
    [E], activations quantized per token (``per_act_token_quant``), with the
    static scales ``a13_scale``/``a2_scale`` (one element each), or per tensor.

    4-bit experts (weight-only; w13 uint8 [E, 2I, H/2], w2 uint8 [E, H, I/2],
    activations in x's dtype): mxfp4 with e8m0 ``w13_scale``/``w2_scale``
    [E, N, K/32], int4 with bf16/fp16/fp32 scales [E, N, K/g] and, for
    asymmetric groups, uint8 zero points ``w13_zp``/``w2_zp`` of the scales'
    shape (see ``grouped_gemm``).
    """
    return torch.ops.fused_moe.fused_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation, is_act_and_mul,
        w13_bias, w2_bias, expert_map,
        -1 if global_num_experts is None else global_num_experts,
        apply_router_weight_on_input, w13_scale, w2_scale, a13_scale, a2_scale,
        None if block_shape is None else list(block_shape), per_act_token_quant, w13_zp, w2_zp)
