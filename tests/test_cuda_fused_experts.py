"""fused_experts on the GPU against the float64 reference: the five PERF.md
model shapes, odd shapes, expert parallelism, CUDA-graph replay, determinism.
Most tests run twice, through the permute -> GEMM -> unpermute chain and
through the two-kernel decode path (FUSED_MOE_DECODE forces one or the other)."""

import pytest
import torch

import fused_moe
from fused_moe import reference
from fused_moe.bench import LAYER_OPTIONS, MODELS
from conftest import random_moe, random_routing, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 1e-2


@pytest.fixture(params=["chain", "decode"])
def path(request, monkeypatch):
    """The CUDA path to force; decode still falls back to the chain where its
    shapes do not fit (rows not whole 16-byte vectors)."""
    monkeypatch.setenv("FUSED_MOE_DECODE", "1" if request.param == "decode" else "0")
    return request.param


def check(m, e, k, h, inter, dtype=torch.bfloat16, skew=None, **kw):
    x = torch.randn(m, h, device="cuda").to(dtype)
    moe = random_moe(e, h, inter, dtype, device="cuda", gated=kw.get("is_act_and_mul", True),
                     bias=kw.pop("bias", False))
    w, ids = random_routing(m, e, k, device="cuda", skew=skew)
    args = dict(w13_bias=moe.get("w13_bias"), w2_bias=moe.get("w2_bias"), **kw)
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, **args)
    ref = reference.fused_experts(x, moe["w13"], moe["w2"], w, ids, **args)
    assert out.dtype == dtype and out.shape == (m, h)
    err = rel_err(out, ref)
    assert err <= BF16_TOL, f"relative error {err:.2e}"
    return err


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("m", [1, 7, 64, 333])
def test_model_shapes(model, m, path):
    torch.cuda.empty_cache()  # two workers each hold up to 21 GiB of weights
    e, k, h, inter = MODELS[model]
    options = LAYER_OPTIONS.get(model, {})
    check(m, e, k, h, inter, activation=options.get("activation", "silu"),
          bias=options.get("has_bias", False))
    torch.cuda.empty_cache()


@pytest.mark.parametrize("h,inter", [(4100, 700), (511, 300), (128, 100), (100, 128), (2048, 768)])
@pytest.mark.parametrize("m", [1, 33, 300])
def test_odd_shapes(h, inter, m, path):
    check(m, 16, 4, h, inter)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu", True), ("gelu_tanh", True),
                                       ("relu2", False), ("swigluoai", True), ("silu", False)])
def test_activations_dtypes(dtype, act, gated, path):
    check(70, 8, 2, 256, 192, dtype=dtype, activation=act, is_act_and_mul=gated, bias=True)


@pytest.mark.parametrize("e,k", [(1, 1), (8, 1), (60, 6), (128, 8), (512, 8)])
def test_expert_counts(e, k, path):
    check(100, e, k, 512, 256)


@pytest.mark.parametrize("skew", ["one", "half"])
@pytest.mark.parametrize("m", [1, 256, 2048])
def test_skewed_routing(skew, m, path):
    check(m, 32, 4, 1024, 512, skew=skew)


def test_router_weight_on_input(path):
    check(90, 16, 1, 512, 256, apply_router_weight_on_input=True)


@pytest.mark.parametrize("m", [1, 50, 600])
def test_expert_map_half_remote(m, path):
    e_global, k, h, inter = 32, 4, 1024, 384
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    full = random_moe(e_global, h, inter, torch.bfloat16, device="cuda", bias=True)
    w, ids = random_routing(m, e_global, k, device="cuda")
    expected = reference.fused_experts(x, full["w13"], full["w2"], w, ids,
                                       w13_bias=full["w13_bias"], w2_bias=full["w2_bias"])
    total = torch.zeros(m, h, dtype=torch.float64, device="cuda")
    for rank in range(2):
        mine = torch.arange(rank, e_global, 2, device="cuda")  # round robin
        expert_map = torch.full((e_global,), -1, dtype=torch.int32, device="cuda")
        expert_map[mine] = torch.arange(len(mine), dtype=torch.int32, device="cuda")
        total += fused_moe.fused_experts(
            x, full["w13"][mine].contiguous(), full["w2"][mine].contiguous(), w, ids,
            w13_bias=full["w13_bias"][mine].contiguous(), w2_bias=full["w2_bias"][mine].contiguous(),
            expert_map=expert_map, global_num_experts=e_global).double()
    assert rel_err(total, expected) <= BF16_TOL


@pytest.mark.parametrize("m", [1, 64, 1024])
def test_cuda_graph_replay_with_new_inputs(m, path):
    e, k, h, inter = 64, 6, 1024, 512
    moe = random_moe(e, h, inter, torch.bfloat16, device="cuda")
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(m, e, device="cuda")

    def forward():
        w, ids = fused_moe.fused_topk(logits, k)
        return fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids)

    forward()  # warm up (workspaces, kernel attributes) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        expected = forward()
        assert torch.equal(out, expected)
        w, ids = reference.fused_topk(logits, k)
        ref = reference.fused_experts(x, moe["w13"], moe["w2"], w.float(), ids)
        assert rel_err(out, ref) <= BF16_TOL


def random_batch(m, e, k, h, inter):
    """fused_experts(rows) on the given rows of a random bf16 batch of m tokens."""
    moe = random_moe(e, h, inter, torch.bfloat16, device="cuda")
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    w, ids = random_routing(m, e, k, device="cuda")
    return lambda rows=slice(None): fused_moe.fused_experts(x[rows], moe["w13"], moe["w2"],
                                                            w[rows], ids[rows])


def test_deterministic_and_batch_invariant():
    run = random_batch(512, 64, 8, 2048, 768)
    full = run()
    assert torch.equal(full, run())
    for m in (1, 8, 100):  # the first m tokens alone, in a smaller batch
        part = run(slice(0, m))
        # Bit-identical needs the same GEMM configuration for both batch sizes;
        # across configurations the result may differ by rounding only.
        assert rel_err(part, full[:m]) <= 1e-2


def test_matches_cpu_kernel():
    e, k, h, inter = 16, 4, 256, 200
    moe = random_moe(e, h, inter, torch.float32, device="cuda", bias=True)
    x = torch.randn(77, h, device="cuda")
    w, ids = random_routing(77, e, k, device="cuda")
    args = dict(w13_bias=moe["w13_bias"], w2_bias=moe["w2_bias"])
    gpu = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, **args)
    cpu = fused_moe.fused_experts(x.cpu(), moe["w13"].cpu(), moe["w2"].cpu(), w.cpu(), ids.cpu(),
                                  w13_bias=moe["w13_bias"].cpu(), w2_bias=moe["w2_bias"].cpu())
    assert rel_err(gpu, cpu) <= 1e-5


def test_decode_matches_chain_with_remote_and_invalid_ids(monkeypatch):
    """Slots on other ranks and ids outside [0, E) contribute nothing on both
    paths; where both run, they differ by rounding only."""
    e_global, e_local, k, h, inter, m = 16, 10, 5, 512, 320, 3  # odd K: a lone last slot
    moe = random_moe(e_local, h, inter, torch.bfloat16, device="cuda", bias=True)
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    w, ids = random_routing(m, e_global, k, device="cuda")
    ids[0, 1], ids[1, 3], ids[2, 4] = -1, e_global, 1 << 20
    expert_map = torch.full((e_global,), -1, dtype=torch.int32, device="cuda")
    expert_map[torch.randperm(e_global, device="cuda")[:e_local]] = torch.arange(
        e_local, dtype=torch.int32, device="cuda")
    args = dict(w13_bias=moe["w13_bias"], w2_bias=moe["w2_bias"], expert_map=expert_map)
    ref = reference.fused_experts(x, moe["w13"], moe["w2"], w, ids, **args)
    out = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("FUSED_MOE_DECODE", forced)
        out[forced] = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, **args)
        assert rel_err(out[forced], ref) <= BF16_TOL
    assert rel_err(out["1"], out["0"]) <= 5e-3


def test_decode_is_batch_invariant(monkeypatch):
    """Each slot is computed alone on the decode path: a token gives the same
    bits whatever batch it sits in."""
    monkeypatch.setenv("FUSED_MOE_DECODE", "1")
    run = random_batch(6, 128, 8, 2048, 768)
    full = run()
    assert torch.equal(full, run())
    for t in (0, 5):
        assert torch.equal(run(slice(t, t + 1)), full[t:t + 1])
