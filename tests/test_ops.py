"""Each op's CPU kernel against the float64 reference, on fresh random inputs."""

import math

import pytest
import torch

import fused_moe
from fused_moe import reference
from conftest import DTYPES, assert_close, random_moe, random_routing, rel_err

EK = [(1, 1), (8, 2), (60, 6), (128, 8), (256, 8), (512, 8), (8, 8), (60, 1)]


# --- routing ----------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,topk", EK)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk(num_experts, topk, scoring_func, dtype):
    logits = torch.randn(67, num_experts).to(dtype)
    for renormalize in (True, False):
        kw = dict(renormalize=renormalize, scoring_func=scoring_func)
        w, ids = fused_moe.fused_topk(logits, topk, **kw)
        rw, rids = reference.fused_topk(logits, topk, **kw)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "num_experts,topk,groups,topk_group",
    [(256, 8, 8, 4), (60, 6, 4, 2), (8, 2, 2, 1), (72, 8, 8, 3), (16, 4, 16, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_grouped_topk(num_experts, topk, groups, topk_group, with_bias, scoring_func):
    logits = torch.randn(129, num_experts)
    bias = torch.randn(num_experts) * 0.1 if with_bias else None
    kw = dict(scoring_func=scoring_func, e_score_correction_bias=bias, num_expert_group=groups,
              topk_group=topk_group, routed_scaling_factor=2.5)
    w, ids = fused_moe.fused_topk(logits, topk, **kw)
    rw, rids = reference.fused_topk(logits, topk, **kw)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)
    # Chosen experts lie in at most topk_group groups.
    per_group = num_experts // groups
    assert all(len(set((r // per_group).tolist())) <= topk_group for r in ids)


def test_bias_selects_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    w, ids = fused_moe.fused_topk(logits, 2, renormalize=False, scoring_func="sigmoid",
                                  e_score_correction_bias=bias, num_expert_group=2, topk_group=2)
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-1.0, 2.0]])))


def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0]])
    _, ids = fused_moe.fused_topk(logits, 4)
    assert ids.tolist() == [[1, 2, 4, 0]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_topk_nonfinite_logits_give_valid_ids(bad):
    logits = torch.randn(16, 60)
    logits[0] = bad            # a whole row
    logits[1, ::3] = bad       # a third of a row
    logits[2, 7] = bad         # one entry
    for kw in ({}, {"scoring_func": "sigmoid", "num_expert_group": 6, "topk_group": 3,
                    "e_score_correction_bias": torch.randn(60)}):
        w, ids = fused_moe.fused_topk(logits, 8, **kw)
        assert ((ids >= 0) & (ids < 60)).all()
        assert all(len(set(r)) == 8 for r in ids.tolist())
        _, rids = reference.fused_topk(logits, 8, **kw)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w[3:].double(), reference.fused_topk(logits, 8, **kw)[0][3:])


# --- permute / unpermute ------------------------------------------------------------


@pytest.mark.parametrize("num_experts,topk", EK)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skew", [None, "one", "half"])
def test_permute(num_experts, topk, dtype, skew):
    m, h = 53, 100
    x = torch.randn(m, h).to(dtype)
    _, ids = random_routing(m, num_experts, topk, skew=skew)
    rows, off, inv = fused_moe.permute(x, ids, num_experts)
    rrows, roff, rinv = reference.permute(x, ids, num_experts)
    assert torch.equal(off, roff) and torch.equal(inv, rinv)
    assert torch.equal(rows.double(), rrows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_expert_map_and_row_weights(dtype):
    m, h, e_global, topk = 41, 36, 16, 4
    x = torch.randn(m, h).to(dtype)
    w, ids = random_routing(m, e_global, topk)
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[1::2] = torch.arange(8, dtype=torch.int32)  # odd experts live here
    rows, off, inv = fused_moe.permute(x, ids, 8, expert_map, w)
    rrows, roff, rinv = reference.permute(x, ids, 8, expert_map, w)
    assert torch.equal(off, roff) and torch.equal(inv, rinv)
    assert (inv == -1).sum() == (ids % 2 == 0).sum()
    assert_close(rows, rrows, dtype)
    assert (rows[off[-1]:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute(dtype, weighted):
    m, k, h = 29, 6, 100
    y = torch.randn(m * k + 5, h).to(dtype)
    inv = torch.randperm(m * k + 5)[: m * k].view(m, k).to(torch.int32)
    inv[::3, 2] = -1
    w = torch.rand(m, k) if weighted else None
    assert_close(fused_moe.unpermute(y, inv, w), reference.unpermute(y, inv, w), dtype)


# --- grouped GEMM and activations ---------------------------------------------------


def random_offsets(num_experts, rows, used):
    cuts = torch.sort(torch.randint(0, used + 1, (num_experts - 1,))).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([used])]).to(torch.int32)


@pytest.mark.parametrize("num_experts,n,k", [(1, 24, 40), (8, 100, 36), (60, 52, 100), (128, 16, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_gemm(num_experts, n, k, dtype, bias):
    rows = 3 * num_experts + 7
    a = torch.randn(rows, k).to(dtype)
    w = (torch.randn(num_experts, n, k) / k**0.5).to(dtype)
    b = torch.randn(num_experts, n).to(dtype) if bias else None
    off = random_offsets(num_experts, rows, rows - 5)
    out = fused_moe.grouped_gemm(a, w, off, b)
    assert_close(out, reference.grouped_gemm(a, w, off, b), dtype)
    assert (out[rows - 5:] == 0).all()


def test_grouped_gemm_all_rows_on_one_expert():
    a, w = torch.randn(40, 24), torch.randn(5, 16, 24)
    off = torch.tensor([0, 0, 0, 40, 40, 40], dtype=torch.int32)
    assert_close(fused_moe.grouped_gemm(a, w, off), reference.grouped_gemm(a, w, off), torch.float32)


# swigluoai is gated only (test_errors checks that it raises otherwise).
ACT_MODES = [(a, g) for a in fused_moe.ACTIVATIONS for g in (True, False)
             if g or a != "swigluoai"]


@pytest.mark.parametrize("act,gated", ACT_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(act, gated, dtype):
    x = (3 * torch.randn(37, 2 * 52 if gated else 52)).to(dtype)
    assert_close(fused_moe.activation(x, act, gated), reference.activation(x, act, gated), dtype)


def test_swigluoai_clamps_by_hand():
    # gate 10 -> 7, up -9 -> -7: (-7 + 1) * 7 * sigmoid(1.702 * 7)
    x = torch.tensor([[10.0, -9.0, 0.5, 0.25]])
    expected = [(-6.0) * 7.0 * torch.sigmoid(torch.tensor(1.702 * 7.0)).item(),
                1.25 * 0.5 * torch.sigmoid(torch.tensor(1.702 * 0.5)).item()]
    torch.testing.assert_close(fused_moe.activation(x, "swigluoai"), torch.tensor([expected]))


def test_permute_takes_int64_ids():
    """torch.topk's int64 ids, read in place: the same rows and indices as int32."""
    m, h, e, k = 29, 40, 12, 3
    x = torch.randn(m, h)
    ids = torch.topk(torch.randn(m, e), k).indices
    assert ids.dtype == torch.int64
    got = fused_moe.permute(x, ids, e)
    want = reference.permute(x, ids, e)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[0].double(), want[0])


# --- the whole expert computation -----------------------------------------------------


@pytest.mark.parametrize("num_experts,topk", EK)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_experts(num_experts, topk, dtype):
    m, h, inter = 33, 100, 52
    x = torch.randn(m, h).to(dtype)
    moe = random_moe(num_experts, h, inter, dtype)
    w, ids = random_routing(m, num_experts, topk)
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids)
    assert out.dtype == dtype and out.shape == (m, h)
    assert_close(out, reference.fused_experts(x, moe["w13"], moe["w2"], w, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_experts_int64_ids(dtype):
    m, h, inter, e, k = 21, 48, 20, 10, 4
    x = torch.randn(m, h).to(dtype)
    moe = random_moe(e, h, inter, dtype)
    w, ids = random_routing(m, e, k)
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids.long())
    assert torch.equal(out, fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids))
    assert_close(out, reference.fused_experts(x, moe["w13"], moe["w2"], w, ids), dtype)


@pytest.mark.parametrize("act,gated", ACT_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_experts_activations_and_bias(act, gated, bias):
    m, e, k, h, inter = 21, 8, 2, 36, 20
    x = torch.randn(m, h)
    moe = random_moe(e, h, inter, torch.float32, gated=gated, bias=bias)
    w, ids = random_routing(m, e, k)
    kw = dict(activation=act, is_act_and_mul=gated, w13_bias=moe.get("w13_bias"),
              w2_bias=moe.get("w2_bias"))
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, **kw)
    ref = reference.fused_experts(x, moe["w13"], moe["w2"], w, ids, **kw)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("skew", ["one", "half"])
def test_fused_experts_skewed(skew):
    m, e, k, h, inter = 64, 16, 4, 40, 24
    x = torch.randn(m, h)
    moe = random_moe(e, h, inter, torch.float32)
    w, ids = random_routing(m, e, k, skew=skew)
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids)
    assert_close(out, reference.fused_experts(x, moe["w13"], moe["w2"], w, ids), torch.float32)


def test_fused_experts_expert_map_half_remote():
    m, e_global, k, h, inter = 40, 16, 4, 36, 20
    x = torch.randn(m, h)
    full = random_moe(e_global, h, inter, torch.float32, bias=True)
    w, ids = random_routing(m, e_global, k)
    expected = reference.fused_experts(x, full["w13"], full["w2"], w, ids,
                                       w13_bias=full["w13_bias"], w2_bias=full["w2_bias"])
    total = torch.zeros(m, h, dtype=torch.float64)
    for rank in range(2):  # two ranks, each owns half of the experts
        mine = torch.arange(rank * 8, rank * 8 + 8)
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[mine] = torch.arange(8, dtype=torch.int32)
        total += fused_moe.fused_experts(
            x, full["w13"][mine].contiguous(), full["w2"][mine].contiguous(), w, ids,
            w13_bias=full["w13_bias"][mine].contiguous(), w2_bias=full["w2_bias"][mine].contiguous(),
            expert_map=expert_map, global_num_experts=e_global).double()
    assert rel_err(total, expected) < 1e-5


def test_fused_experts_router_weight_on_input():
    m, e, h, inter = 30, 8, 36, 20
    x = torch.randn(m, h)
    moe = random_moe(e, h, inter, torch.float32)
    w, ids = random_routing(m, e, 1)
    w = torch.rand(m, 1)  # not renormalized, so applying it on input differs
    kw = dict(apply_router_weight_on_input=True)
    out = fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids, **kw)
    assert_close(out, reference.fused_experts(x, moe["w13"], moe["w2"], w, ids, **kw), torch.float32)


def test_empty_batch():
    moe = random_moe(8, 36, 20, torch.float32)
    x = torch.randn(0, 36)
    w, ids = fused_moe.fused_topk(torch.randn(0, 8), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    assert fused_moe.fused_experts(x, moe["w13"], moe["w2"], w, ids).shape == (0, 36)
