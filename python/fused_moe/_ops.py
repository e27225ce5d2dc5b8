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
    a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """out[r] = w[e] @ a[r] (+ bias[e]) for rows r of expert e; w is [E, N, K]."""
    return _ops.grouped_gemm(a, w, expert_offsets, bias)


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
def _grouped_gemm_fake(a, w, expert_offsets, bias):
    return a.new_empty((a.shape[0], w.shape[1]))


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
