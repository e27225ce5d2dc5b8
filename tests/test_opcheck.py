"""torch.library.opcheck on every op: schema, fake kernel, dispatch under
torch.compile's AOT path, on the CPU (and on CUDA when present)."""

import pytest
import torch

import fused_moe  # noqa: F401
from conftest import random_moe, random_routing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases(device):
    m, e, k, h, inter = 19, 8, 2, 36, 20
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    logits = torch.randn(m, e, device=device)
    w, ids = random_routing(m, e, k, device=device)
    moe = random_moe(e, h, inter, torch.bfloat16, device=device, bias=True)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32, device=device)
    rows, off, inv = torch.ops.fused_moe.permute(x, ids, e, None, None)
    return {
        "topk": [
            (logits, k, True, "softmax", None, 0, 0, 1.0),
            (logits, 4, False, "sigmoid", torch.randn(e, device=device), 4, 2, 2.5),
        ],
        "permute": [(x, ids, e, None, None), (x, ids, 4, expert_map, w)],
        "grouped_gemm": [(rows, moe["w13"], off, None), (rows, moe["w13"], off, moe["w13_bias"])],
        "activation": [(rows, "silu", True), (rows, "relu2", False), (rows, "swigluoai", True)],
        "unpermute": [(rows, inv, w), (rows, inv, None)],
        "fused_experts": [
            (x, moe["w13"], moe["w2"], w, ids, "silu", True, None, None, None, -1, False),
            (x, moe["w13"][:4].contiguous(), moe["w2"][:4].contiguous(), w, ids, "gelu", True,
             moe["w13_bias"][:4].contiguous(), moe["w2_bias"][:4].contiguous(), expert_map, 8, False),
        ],
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["topk", "permute", "grouped_gemm", "activation", "unpermute",
                                "fused_experts"])
def test_opcheck(op, device):
    for args in cases(device)[op]:
        torch.library.opcheck(getattr(torch.ops.fused_moe, op), args)
