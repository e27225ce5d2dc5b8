"""fused_moe: the Mixture-of-Experts layer of modern LLMs as fast PyTorch ops.

    topk_weights, topk_ids = fused_moe.fused_topk(router_logits, top_k)
    out = fused_moe.fused_experts(x, w13, w2, topk_weights, topk_ids)
"""

from ._ops import activation, grouped_gemm, permute, quantize_fp8, topk, unpermute
from .experts import ACTIVATIONS, fused_experts
from .layer import FusedMoE
from .parallel import determine_expert_map
from .quant import QuantConfig
from .routing import SCORING_FUNCS, fused_topk

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "FusedMoE",
    "QuantConfig",
    "SCORING_FUNCS",
    "activation",
    "determine_expert_map",
    "fused_experts",
    "fused_topk",
    "grouped_gemm",
    "permute",
    "quantize_fp8",
    "topk",
    "unpermute",
]
