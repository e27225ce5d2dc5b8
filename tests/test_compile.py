"""torch.compile(fullgraph=True) traces fused_topk + fused_experts and matches eager."""

import pytest
import torch

import fused_moe
from conftest import random_moe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def moe_block(x, router_logits, w13, w2):
    weights, ids = fused_moe.fused_topk(router_logits, 2)
    return fused_moe.fused_experts(x, w13, w2, weights, ids) * 2.0 + x


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    moe = random_moe(8, 64, 40, torch.float32, device=device)
    compiled = torch.compile(moe_block, fullgraph=True, dynamic=True)
    for m in (5, 17):  # two batch sizes: the graph is traced with a symbolic M
        x = torch.randn(m, 64, device=device)
        logits = torch.randn(m, 8, device=device)
        torch.testing.assert_close(compiled(x, logits, moe["w13"], moe["w2"]),
                                   moe_block(x, logits, moe["w13"], moe["w2"]))
