"""Every op takes views of any strides, as torch ops and vLLM's kernels do:
weights padded per row (vLLM's `F.pad(w, (0, 128))[..., :-128]`, and by 3
elements, off the 16-byte alignment, which the ops copy), expert-strided
weights, sliced hidden_states, transposed weights (innermost stride != 1).
A view gives the bits of the same call on dense copies, and matches the
float64 reference; on the GPU the aligned views are read in place."""

import pytest
import torch
import torch.nn.functional as F

import fused_moe
from fused_moe import reference
from conftest import assert_close, random_moe, random_routing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ops = torch.ops.fused_moe


def padded(t, pad):
    """t's values in a view whose rows are `pad` elements longer."""
    return F.pad(t, (0, pad))[..., :-pad]


def every_other(t):
    """t's values as the even entries of a tensor twice as long along dim 0."""
    big = torch.empty((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    big[::2] = t
    big[1::2] = torch.randn_like(t)
    return big[::2]


def transposed(t):
    """t's values with the last two dims stored the other way round."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def sliced(x, pad=24):
    """x's values as the first columns of a wider matrix (a projection's split)."""
    big = torch.randn(x.shape[0], x.shape[1] + pad, dtype=x.dtype, device=x.device)
    big[:, :x.shape[1]] = x
    return big[:, :x.shape[1]]


VIEWS = {"pad128": lambda t: padded(t, 128), "pad3": lambda t: padded(t, 3),
         "experts": every_other, "transposed": transposed}


def moe_case(device, m, e=8, k=2, h=256, inter=128, dtype=torch.bfloat16, bias=False):
    x = torch.randn(m, h, device=device, dtype=dtype)
    moe = random_moe(e, h, inter, dtype, device=device, bias=bias)
    w, ids = random_routing(m, e, k, device=device)
    return x, moe, w, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("m", [1, 5, 300])
@pytest.mark.parametrize("decode", ["0", "1"])
def test_fused_experts_strided_weights(device, view, m, decode, monkeypatch):
    monkeypatch.setenv("FUSED_MOE_DECODE", decode)
    x, moe, w, ids = moe_case(device, m, bias=True)
    dense = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, w13_bias=moe["w13_bias"],
                                    w2_bias=moe["w2_bias"])
    w13, w2 = VIEWS[view](moe["w13"]), VIEWS[view](moe["w2"])
    assert not w13.is_contiguous()
    out = fused_moe.fused_experts(sliced(x), w13, w2, w, ids, w13_bias=moe["w13_bias"],
                                  w2_bias=moe["w2_bias"])
    assert out.is_contiguous() and torch.equal(out, dense)
    ref = reference.fused_experts(x.cpu(), moe["w13"].cpu(), moe["w2"].cpu(), w.cpu(), ids.cpu(),
                                  w13_bias=moe["w13_bias"].cpu(), w2_bias=moe["w2_bias"].cpu())
    assert_close(out, ref, x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["pad128", "pad3", "experts"])
def test_fused_experts_strided_with_expert_map(device, view):
    """Expert parallelism on views: half the experts on this rank, the
    weights a strided slice of a larger set."""
    x, moe, w, ids = moe_case(device, 40, e=16, k=4)
    local = {n: moe[n][1::2].contiguous() for n in ("w13", "w2")}
    expert_map = torch.full((16,), -1, dtype=torch.int32, device=device)
    expert_map[1::2] = torch.arange(8, dtype=torch.int32, device=device)
    kw = dict(expert_map=expert_map, global_num_experts=16)
    dense = fused_moe.fused_experts(x, local["w13"], local["w2"], w, ids, **kw)
    out = fused_moe.fused_experts(x, VIEWS[view](local["w13"]), VIEWS[view](local["w2"]), w, ids,
                                  **kw)
    assert torch.equal(out, dense)
    ref = reference.fused_experts(x.cpu(), local["w13"].cpu(), local["w2"].cpu(), w.cpu(),
                                  ids.cpu(), expert_map=expert_map.cpu(), global_num_experts=16)
    assert_close(out, ref, x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", list(VIEWS))
def test_ops_strided(device, view):
    """Each op on views gives the bits of the op on dense copies."""
    x, moe, w, ids = moe_case(device, 70)
    rows, off, inv = ops.permute(x, ids, 8, None, None)
    got = ops.permute(sliced(x), ids.t().contiguous().t(), 8, None, w.t().contiguous().t())
    want = ops.permute(x, ids, 8, None, w)
    assert all(torch.equal(g, h) for g, h in zip(got, want))
    w13 = VIEWS[view](moe["w13"])
    assert torch.equal(ops.grouped_gemm(sliced(rows), w13, off, None),
                       ops.grouped_gemm(rows, moe["w13"], off, None))
    h13 = ops.grouped_gemm(rows, moe["w13"], off, None)
    assert torch.equal(ops.activation(sliced(h13), "silu", True), ops.activation(h13, "silu", True))
    assert torch.equal(ops.unpermute(sliced(rows), inv.t().contiguous().t(), w),
                       ops.unpermute(rows, inv, w))
    logits = torch.randn(70, 8, device=device)
    assert all(torch.equal(g, h) for g, h in zip(
        ops.topk(sliced(logits), 2, True, "softmax", None, 0, 0, 1.0),
        ops.topk(logits, 2, True, "softmax", None, 0, 0, 1.0)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_strided(device):
    x, moe, w, ids = moe_case(device, 19, h=64, inter=32)
    torch.library.opcheck(ops.fused_experts, (
        sliced(x), padded(moe["w13"], 128), every_other(moe["w2"]), w, ids, "silu", True, None,
        None, None, -1, False))
    rows, off, _ = ops.permute(x, ids, 8, None, None)
    torch.library.opcheck(ops.grouped_gemm, (sliced(rows), padded(moe["w13"], 3), off, None))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_strided(device):
    x, moe, w, ids = moe_case(device, 33)
    w13, w2 = padded(moe["w13"], 128), padded(moe["w2"], 128)
    fn = torch.compile(fused_moe.fused_experts, fullgraph=True)
    assert torch.equal(fn(x, w13, w2, w, ids), fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 200])
def test_cuda_graph_replay_strided(m):
    """Views captured into a CUDA graph replay with new values in them."""
    x, moe, w, ids = moe_case("cuda", m)
    w13, w2 = padded(moe["w13"], 128), padded(moe["w2"], 128)
    xs = sliced(x)
    fused_moe.fused_experts(xs, w13, w2, w, ids)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.fused_experts(xs, w13, w2, w, ids)
    x2, moe2, w_2, ids2 = moe_case("cuda", m)
    for dst, src in ((xs, x2), (w13, moe2["w13"]), (w2, moe2["w2"]), (w, w_2), (ids, ids2)):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(out, fused_moe.fused_experts(x2, moe2["w13"], moe2["w2"], w_2, ids2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reads_aligned_views_in_place():
    """A 16-byte-aligned view costs no copy of the weights: the call's extra
    memory stays far under one copy of w13."""
    x, moe, w, ids = moe_case("cuda", 64, e=64, h=1024, inter=512)
    w13, w2 = padded(moe["w13"], 128), padded(moe["w2"], 128)
    fused_moe.fused_experts(x, w13, w2, w, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_moe.fused_experts(x, w13, w2, w, ids)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < moe["w13"].nbytes // 4


def copies_made(fn, *args):
    """The ATen copy ops (clone, contiguous) run by fn(*args), as the profiler saw them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return [e.name for e in prof.events() if e.name in ("aten::clone", "aten::contiguous")]


@pytest.mark.parametrize("pad, copied", [(128, False), (3, True)])
def test_cpu_reads_aligned_views_in_place(pad, copied):
    """On the CPU too, 16-byte-aligned row-strided views are read in place
    (no copy op runs), and a misaligned one is copied."""
    x, moe, w, ids = moe_case("cpu", 40)
    w13, w2 = padded(moe["w13"], pad), padded(moe["w2"], pad)
    rows, off, inv = ops.permute(x, ids, 8, None, None)
    h13 = ops.grouped_gemm(rows, moe["w13"], off, None)
    calls = {
        "fused_experts": (fused_moe.fused_experts, padded(x, pad), w13, w2, w, ids),
        "permute": (ops.permute, padded(x, pad), ids, 8, None, None),
        "grouped_gemm": (ops.grouped_gemm, padded(rows, pad), w13, off, None),
        "activation": (ops.activation, padded(h13, pad), "silu", True),
        "unpermute": (ops.unpermute, padded(rows, pad), inv, w),
    }
    for name, (fn, *args) in calls.items():
        assert bool(copies_made(fn, *args)) == copied, name
