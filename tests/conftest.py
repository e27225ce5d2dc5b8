import zlib

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Relative Frobenius error allowed against the float64 reference: fp32 kernels
# accumulate in fp32; bf16/fp16 ones round their inputs, intermediates and output.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), "output has NaN"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3e} > {TOLERANCE[dtype]:.1e} ({dtype})"


def random_moe(num_experts, hidden, inter, dtype, device="cpu", gated=True, bias=False, gen=None):
    """Weights as PERF.md draws them: w13 ~ N(0,1)/sqrt(H), w2 ~ N(0,1)/sqrt(I)."""
    rows = 2 * inter if gated else inter
    # Drawn on the target device in the target dtype and scaled in place
    # (DeepSeek-V3's w13 is 28 GiB in fp32), unless a CPU generator is given.

    def draw(*shape, scale):
        if gen is not None:
            return torch.randn(*shape, generator=gen).mul_(scale).to(dtype).to(device)
        return torch.randn(*shape, device=device, dtype=dtype).mul_(scale)

    out = {"w13": draw(num_experts, rows, hidden, scale=hidden**-0.5),
           "w2": draw(num_experts, hidden, inter, scale=inter**-0.5)}
    if bias:
        out["w13_bias"] = draw(num_experts, rows, scale=0.1)
        out["w2_bias"] = draw(num_experts, hidden, scale=0.1)
    return out


def random_routing(num_tokens, num_experts, topk, device="cpu", skew=None, gen=None):
    """topk of softmax(N(0,1) logits), renormalized. skew="one" sends every
    token's first choice to expert 0; skew="half" leaves the upper half of the
    experts without tokens."""
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skew == "one":
        logits[:, 0] += 100.0
    elif skew == "half" and num_experts > 1:
        logits[:, num_experts // 2:] -= 1000.0
    weights, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.float().to(device), ids.to(torch.int32).to(device)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh data for every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
