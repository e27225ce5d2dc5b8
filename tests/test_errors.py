"""Bad inputs raise, naming the argument, the value and what was expected."""

import pytest
import torch

import fused_moe
from conftest import random_moe, random_routing

M, E, K, H, I = 8, 8, 2, 16, 12


@pytest.fixture
def moe():
    x = torch.randn(M, H)
    w, ids = random_routing(M, E, K)
    return dict(x=x, w=w, ids=ids, **random_moe(E, H, I, torch.float32, bias=True))


def run(moe, **over):
    a = {**moe, **over}
    return fused_moe.fused_experts(a["x"], a["w13"], a["w2"], a["w"], a["ids"],
                                   w13_bias=a.get("b13"), w2_bias=a.get("b2"),
                                   activation=a.get("act", "silu"),
                                   is_act_and_mul=a.get("gated", True),
                                   expert_map=a.get("expert_map"),
                                   apply_router_weight_on_input=a.get("on_input", False))


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(M, H).to(torch.float64)), r"hidden_states must be Float or BFloat16 or Half, got Double"),
    (dict(x=torch.randn(M, H, 2)), r"hidden_states must have shape \[\*, \*\], got \[8, 16, 2\]"),
    (dict(w13=torch.randn(E, 2 * I, H + 1)), r"w13 must have shape \[\*, \*, 16\], got \[8, 24, 17\]"),
    (dict(w13=torch.randn(E, 2 * I, H).bfloat16()), r"w13 must be Float, got BFloat16"),
    (dict(w2=torch.randn(E, H, I + 1)), r"w2 must have shape \[8, 16, 12\], got \[8, 16, 13\]"),
    (dict(w=torch.rand(M, K).double()), r"topk_weights must be Float, got Double"),
    (dict(ids=torch.randint(0, E, (M, K)).float()), r"topk_ids must be Int or Long, got Float"),
    (dict(ids=torch.full((M, K), 2**32 + 1)), r"topk_ids must be in \[0, 8\), got 4294967297"),
    (dict(ids=torch.full((M, K), E, dtype=torch.int32)), r"topk_ids must be in \[0, 8\), got 8"),
    (dict(ids=torch.full((M, K), -3, dtype=torch.int32)), r"topk_ids must be in \[0, 8\), got -3"),
    (dict(b13=torch.randn(E, I)), r"w13_bias must have shape \[8, 24\], got \[8, 12\]"),
    (dict(b2=torch.randn(E, H + 1)), r"w2_bias must have shape \[8, 16\], got \[8, 17\]"),
    (dict(act="swish"), r"activation must be one of .*, got 'swish'"),
    (dict(act="swigluoai", gated=False, w13=torch.randn(E, I, H)), r"swigluoai' needs is_act_and_mul=True"),
    (dict(on_input=True), r"apply_router_weight_on_input needs topk == 1, got topk=2"),
    (dict(expert_map=torch.zeros(E, dtype=torch.int64)), r"expert_map must be Int, got Long"),
])
def test_fused_experts_rejects(moe, over, match):
    with pytest.raises(RuntimeError, match=match):
        run(moe, **over)


def test_topk_rejects():
    logits = torch.randn(M, E)
    with pytest.raises(RuntimeError, match=r"topk must be in \[1, num_experts=8\], got 9"):
        fused_moe.fused_topk(logits, 9)
    with pytest.raises(RuntimeError, match=r"scoring_func must be 'softmax' or 'sigmoid', got 'tanh'"):
        fused_moe.fused_topk(logits, 2, scoring_func="tanh")
    with pytest.raises(RuntimeError, match=r"num_expert_group=3 must divide num_experts=8"):
        fused_moe.fused_topk(logits, 2, num_expert_group=3, topk_group=1)
    with pytest.raises(RuntimeError, match=r"topk_group must be in \[1, num_expert_group=4\], got 5"):
        fused_moe.fused_topk(logits, 2, num_expert_group=4, topk_group=5)
    with pytest.raises(RuntimeError, match=r"topk=6 exceeds the experts in the kept groups"):
        fused_moe.fused_topk(logits, 6, num_expert_group=4, topk_group=2)
    with pytest.raises(RuntimeError, match=r"e_score_correction_bias must have shape \[8\], got \[7\]"):
        fused_moe.fused_topk(logits, 2, e_score_correction_bias=torch.randn(7))
    with pytest.raises(ValueError, match=r"num_expert_group and topk_group go together"):
        fused_moe.fused_topk(logits, 2, num_expert_group=4)


def test_op_level_rejects():
    a, w = torch.randn(10, 16), torch.randn(4, 8, 16)
    bad_off = torch.tensor([0, 5, 3, 8, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"expert_offsets must rise from 0"):
        fused_moe.grouped_gemm(a, w, bad_off)
    with pytest.raises(RuntimeError, match=r"expert_offsets must have shape \[5\], got \[4\]"):
        fused_moe.grouped_gemm(a, w, bad_off[:4])
    with pytest.raises(RuntimeError, match=r"expert_offsets must be in \[0, 11\), got 11"):
        fused_moe.grouped_gemm(a, w, torch.tensor([0, 5, 6, 8, 11], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"expert_offsets must rise from 0, got expert_offsets\[0\]=1"):
        fused_moe.grouped_gemm(a, w, torch.tensor([1, 5, 6, 8, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4, 8\], got \[4, 16\]"):
        fused_moe.grouped_gemm(a, w, torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32), torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"even number of columns"):
        fused_moe.activation(torch.randn(3, 7), "silu", True)
    with pytest.raises(RuntimeError, match=r"inv_index must be in \[-1, 10\), got 10"):
        fused_moe.unpermute(a, torch.full((2, 2), 10, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch(moe):
    with pytest.raises(RuntimeError, match=r"w13 must be on the device of hidden_states \(cuda:0\), got cpu"):
        run(moe, x=moe["x"].cuda(), w=moe["w"].cuda(), ids=moe["ids"].cuda())
