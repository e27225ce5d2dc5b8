"""fused_topk: the router of an MoE layer, as one op."""

from __future__ import annotations

import torch

from . import _ops

SCORING_FUNCS = ("softmax", "sigmoid")


def fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``topk`` experts per token from router logits ``gating_output`` [M, E].

    Scores are ``softmax`` or ``sigmoid`` of the logits (in fp32).
    ``e_score_correction_bias`` [E] is added to the scores for choosing experts
    only; the weights are the unbiased scores. With ``num_expert_group`` and
    ``topk_group`` (DeepSeek-V3), experts are split into groups, each group
    scored by its best expert (by the sum of its best two when a bias is
    given), and experts are chosen only from the ``topk_group`` best groups.
    Ties go to the lower index; NaN scores rank below every number, so the ids
    are always valid and distinct. Weights are renormalized to sum to one when
    ``renormalize``, then multiplied by ``routed_scaling_factor``.

    Returns ``(topk_weights float32 [M, K], topk_ids int32 [M, K])``, best first.
    """
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            "fused_topk: num_expert_group and topk_group go together, got "
            f"num_expert_group={num_expert_group}, topk_group={topk_group}")
    bias = e_score_correction_bias
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return _ops.topk(gating_output, topk, renormalize, scoring_func, bias,
                     num_expert_group or 0, topk_group or 0, float(routed_scaling_factor))
