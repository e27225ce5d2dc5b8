"""The cases of vLLM's own fused-MoE kernel test, on fused_moe.fused_experts:
its (M, N, K) list (N the intermediate size, K the hidden size, up to 40000
tokens and K = 511), 8/64/192 experts, top-2 and top-6, expert parallelism
over 4 ranks with random expert ids, and `padding` (each weight row 128
elements longer, a row-strided view). Same tolerance as vLLM's test
(atol 2e-2 against a torch computation in the input dtype); here the
reference is float32 torch on the GPU, per expert."""

import pytest
import torch
import torch.nn.functional as F

import fused_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MNK = [(1, 128, 128), (1, 2048, 128), (33, 2048, 128), (222, 1024, 1024), (32768, 128, 128),
       (32768, 2048, 511), (40000, 1024, 1024)]


def torch_moe(a, w1, w2, weights, ids, expert_map):
    """float32 per-expert loop; ids global, expert_map global -> local or -1."""
    out = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    local = expert_map[ids.long()] if expert_map is not None else ids.long()
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = a[tok].float() @ w1[e].float().T
        n = h.shape[1] // 2
        y = (F.silu(h[:, :n]) * h[:, n:]) @ w2[e].float().T
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out.to(a.dtype)


@pytest.mark.parametrize("m,n,k", MNK)
@pytest.mark.parametrize("e", [8, 64, 192])
@pytest.mark.parametrize("topk", [2, 6])
@pytest.mark.parametrize("ep_size", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padding", [False, True])
def test_vllm_fused_moe_case(m, n, k, e, topk, ep_size, dtype, padding):
    dev = "cuda"
    a = torch.randn(m, k, device=dev, dtype=dtype) / 10
    w1 = torch.randn(e, 2 * n, k, device=dev, dtype=dtype) / 10
    w2 = torch.randn(e, k, n, device=dev, dtype=dtype) / 10
    score = torch.randn(m, e, device=dev, dtype=dtype)
    expert_map = None
    if ep_size > 1:
        local_e = e // ep_size
        e_ids = torch.randperm(e, device=dev)[:local_e]
        expert_map = torch.full((e,), -1, device=dev, dtype=torch.int32)
        expert_map[e_ids] = torch.arange(local_e, device=dev, dtype=torch.int32)
        w1, w2 = w1[e_ids], w2[e_ids]
    weights, ids = torch.topk(torch.softmax(score.float(), -1), topk)
    ref = torch_moe(a, w1, w2, weights, ids, expert_map)
    if padding:
        w1 = F.pad(w1, (0, 128))[..., :-128]
        w2 = F.pad(w2, (0, 128))[..., :-128]
    out = fused_moe.fused_experts(a, w1, w2, weights, ids, expert_map=expert_map,
                                  global_num_experts=e)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
