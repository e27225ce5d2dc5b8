"""4-bit weight-only experts (mxfp4, int4 with and without zero points):
the dequantization formula to the bit, quantize_weight/dequantize_weight, and
grouped_gemm and fused_experts on packed weights against the float64
reference, on CPU and CUDA."""

import pytest
import torch

import fused_moe
from fused_moe import quant, reference
from conftest import random_moe, random_routing, rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEMM_TOL = 1e-2
EXPERTS_TOL = 3.5e-2
SCHEMES = ["mxfp4", "int4-g32", "int4-g64", "int4-g128", "int4-g128-asym"]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# (H, I) per scheme: multiples of the group, not of 128 where the group allows
# (gpt-oss's 2880 = 22.5 * 128 scaled down).
DIMS = {"mxfp4": (288, 160), "int4-g32": (288, 160), "int4-g64": (320, 192),
        "int4-g128": (384, 256), "int4-g128-asym": (384, 256)}


def quantized(w, name):
    """w [E, N, K] -> dict(w=packed, scale=..., zp=... or None)."""
    out = quant.quantize_weight(w, quant.as_quant_config(name))
    return {"w": out[0], "scale": out[1], "zp": out[2] if len(out) > 2 else None}


def layer4(e, h, i, name, device, dtype=torch.bfloat16, bias=False):
    """A random MoE layer, its float weights and the fused_experts kwargs of its 4-bit form."""
    moe = random_moe(e, h, i, dtype, device, bias=bias)
    q13, q2 = quantized(moe["w13"], name), quantized(moe["w2"], name)
    kw = {"w13_scale": q13["scale"], "w2_scale": q2["scale"], "w13_zp": q13["zp"],
          "w2_zp": q2["zp"], "w13_bias": moe.get("w13_bias"), "w2_bias": moe.get("w2_bias")}
    return moe, q13["w"], q2["w"], kw


def identity_gemm(w, scale, zp=None, dtype=torch.float32):
    """The op's dequantized w [1, N, K] read back exactly: I_K times w[0]^T,
    in dtype (16-bit: the weights as the op rounds them to it)."""
    k = 2 * w.shape[2]
    a = torch.eye(k, dtype=dtype, device=w.device)
    off = torch.tensor([0, k], dtype=torch.int32, device=w.device)
    return fused_moe.grouped_gemm(a, w, off, w_scale=scale, w_zp=zp).T


def all_dequantizers(w, scale, zp=None):
    return {"quant": quant.dequantize_weight(w, scale, zero_point=zp, dtype=torch.float64),
            "reference": reference.dequantize_4bit(w, scale, zp)}


def every_code(rows, groups):
    """Packed [1, rows, 8 * groups], code (k + r) % 16 at row r, column k."""
    k = 16 * groups
    codes = (torch.arange(k)[None, :] + torch.arange(rows)[:, None]) % 16
    return quant.pack_4bit(codes)[None], codes


# --- the formula, bit for bit ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_mxfp4_every_code_and_exponent(device):
    exponents = [0, 1, 100, 126, 127, 128, 252]  # finite in fp32 at every code
    w, codes = every_code(len(exponents), 2)  # one group of 32 columns a row
    scale = torch.tensor(exponents, dtype=torch.uint8)[None, :, None]
    expected = torch.tensor(E2M1, dtype=torch.float64)[codes] \
        * torch.pow(2.0, torch.tensor(exponents, dtype=torch.float64) - 127)[:, None]
    got = identity_gemm(w.to(device), scale.to(device))
    assert torch.equal(got.cpu(), expected.float()), "op's mxfp4 values differ from the table"
    for name, d in all_dequantizers(w, scale).items():
        assert torch.equal(d[0], expected), name
    # float8_e8m0fnu scales are the same bytes.
    e8m0 = scale.view(torch.float8_e8m0fnu).to(device)
    assert torch.equal(identity_gemm(w.to(device), e8m0).cpu(), got.cpu())


def test_mxfp4_edge_exponents():
    w, codes = every_code(3, 2)
    scale = torch.tensor([0, 254, 255], dtype=torch.uint8)[None, :, None]
    table = torch.tensor(E2M1, dtype=torch.float64)[codes]
    for name, d in all_dequantizers(w, scale).items():
        assert torch.equal(d[0, 0], table[0] * 2.0**-127), name
        assert torch.equal(d[0, 1], table[1] * 2.0**127), name
        assert d[0, 2].isnan().all(), f"{name}: e8m0 255 must be NaN"
    nan_row = identity_gemm(w[:, 2:], scale[:, 2:])
    assert nan_row.isnan().all(), "the op's e8m0 255 must be NaN"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_zp", [False, True])
def test_int4_every_code(device, scale_dtype, with_zp):
    rows, groups = 16, 2
    w, codes = every_code(rows, groups)
    scale = (torch.rand(1, rows, groups) + 0.1).to(scale_dtype)
    zp = torch.randint(0, 16, (1, rows, groups), dtype=torch.uint8) if with_zp else None
    zero = zp.double().repeat_interleave(16, -1)[0] if with_zp else 8.0
    expected = (codes.double() - zero) * scale.double().repeat_interleave(16, -1)[0]
    got = identity_gemm(w.to(device), scale.to(device), None if zp is None else zp.to(device))
    assert torch.equal(got.cpu(), expected.float()), "op's int4 values differ from (c - z) * s"
    for name, d in all_dequantizers(w, scale, zp).items():
        assert torch.equal(d[0], expected), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["mxfp4", "int4", "int4-zp"])
@pytest.mark.parametrize("group", [32, 64])
def test_16bit_activations_see_weights_rounded_to_their_type(device, dtype, scheme, group):
    """bf16/fp16 activations multiply the weights rounded once to their type
    (the value in fp32, then to dtype), every code, groups of whole 32-code
    vectors (the CPU's vector decoder) and scales of the activations' type."""
    if scheme == "mxfp4" and group != 32:
        pytest.skip("mxfp4 groups are 32")
    rows, k = 16, 128
    w, codes = every_code(rows, k // 16)
    groups = k // group
    if scheme == "mxfp4":
        scale = torch.randint(110, 136, (1, rows, groups), dtype=torch.uint8)
        value = torch.tensor(E2M1, dtype=torch.float64)[codes] \
            * torch.pow(2.0, scale.double() - 127).repeat_interleave(group, -1)[0]
        zp = None
    else:
        scale = (torch.rand(1, rows, groups) + 0.1).to(dtype)
        zp = torch.randint(0, 16, (1, rows, groups), dtype=torch.uint8) if scheme == "int4-zp" else None
        zero = zp.double().repeat_interleave(group, -1)[0] if zp is not None else 8.0
        value = (codes.double() - zero) * scale.double().repeat_interleave(group, -1)[0]
    got = identity_gemm(w.to(device), scale.to(device), None if zp is None else zp.to(device), dtype)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), value.float().to(dtype)), f"{scheme} g{group}: not rounded once"


# --- quantize_weight / dequantize_weight -----------------------------------------------


def test_mxfp4_scale_is_the_smallest_that_fits():
    w = torch.randn(1, 4, 32) * 0.01
    for row, amax in enumerate([6.0, 6.0001, 3.0, 0.75]):
        w[0, row, 5] = amax
    q, s = quant.quantize_weight(w, quant.QuantConfig.mxfp4())
    assert s[0, :, 0].tolist() == [127, 128, 126, 124]
    # 6.0001 / 2 rounds to 3: the exponent grew, the value did not saturate.
    assert quant.dequantize_weight(q, s)[0, :, 5].tolist() == [6.0, 6.0, 3.0, 0.75]


def test_mxfp4_ties_to_even_and_zero_group():
    w = torch.zeros(1, 2, 32)
    w[0, 0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    q, s = quant.quantize_weight(w, quant.QuantConfig.mxfp4())
    assert s[0, 0, 0].item() == 127 and s[0, 1, 0].item() == 0
    got = quant.dequantize_weight(q, s)[0, 0, :8].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert quant.dequantize_weight(q, s)[0, 1].abs().sum().item() == 0.0


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_round_trip(name, dtype):
    config = quant.as_quant_config(name)
    w = torch.randn(3, 24, 256).to(dtype)
    out = quant.quantize_weight(w, config)
    assert out[0].dtype == torch.uint8 and out[0].shape == (3, 24, 128)
    assert out[1].shape == config.weight_scale_shape(3, 24, 256)
    assert len(out) == (3 if config.zero_point else 2)
    zp = out[2] if len(out) > 2 else None
    dq = quant.dequantize_weight(*out[:2], zero_point=zp)
    assert torch.equal(quant.dequantize_weight(*out[:2], zero_point=zp, dtype=torch.float64),
                       reference.dequantize_4bit(*out))
    err = rel_err(dq, w)
    assert err < 0.15, f"{name}: relative error {err:.3f} of the 4-bit round trip"
    # Dequantized weights are on the grid: quantizing them again moves them
    # little (not always nothing: a rounded float scale may shift the grid).
    again = quant.quantize_weight(dq.to(dtype), config)
    dq2 = quant.dequantize_weight(*again[:2], zero_point=again[2] if len(again) > 2 else None)
    assert rel_err(dq2, dq) < 3e-2
    if name == "mxfp4":  # exact (a group whose amax rounded down to 3 * 2^x re-encodes at x - 1)
        assert torch.equal(dq2, dq)


def test_from_checkpoint_4bit():
    q = quant.QuantConfig
    assert q.from_checkpoint({"quant_method": "mxfp4"}) == q.mxfp4()
    assert q.from_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 128,
                              "sym": True, "desc_act": False}) == q.int4(128)
    assert q.from_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 64,
                              "sym": False}) == q.int4(64, symmetric=False)
    assert q.from_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": -1}) == q.int4(None)
    assert q.from_checkpoint({"quant_method": "awq", "bits": 4, "group_size": 128,
                              "zero_point": True}) == q.int4(128, symmetric=False)
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"weights": {"type": "int", "num_bits": 4,
                                                    "strategy": "group", "group_size": 32,
                                                    "symmetric": True},
                                        "input_activations": None}}}
    assert q.from_checkpoint(ct) == q.int4(32)
    with pytest.raises(NotImplementedError, match="desc_act.*g_idx"):
        q.from_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 128,
                           "desc_act": True})
    with pytest.raises(NotImplementedError, match="bits=8"):
        q.from_checkpoint({"quant_method": "gptq", "bits": 8, "group_size": 128})
    for name in SCHEMES:
        assert quant.as_quant_config(name).packed4


# --- the ops against the float64 reference ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.bfloat16, True),
                                        (torch.float16, False), (torch.float32, True)])
def test_grouped_gemm_matches_reference(device, name, dtype, bias):
    e, n, k = 5, 96, DIMS[name][0]
    w = torch.randn(e, n, k, device=device, dtype=dtype) * k**-0.5
    q = quantized(w, name)
    a = torch.randn(41, k, device=device, dtype=dtype)
    off = torch.tensor([0, 9, 9, 30, 37, 40], dtype=torch.int32, device=device)  # an empty expert,
    b = torch.randn(e, n, device=device, dtype=dtype) * 0.1 if bias else None  # a row past the end
    out = fused_moe.grouped_gemm(a, q["w"], off, b, w_scale=q["scale"], w_zp=q["zp"])
    assert out.dtype == dtype and out.shape == (41, n)
    ref = reference.grouped_gemm(a, q["w"], off, b, w_scale=q["scale"], w_zp=q["zp"])
    assert rel_err(out, ref) <= GEMM_TOL
    assert (out[40] == 0).all()
    unquantized = reference.grouped_gemm(a, w, off, b)
    print(f"{name} {dtype}: vs reference {rel_err(out, ref):.2e}, "
          f"vs unquantized {rel_err(out, unquantized):.2e}")


CASES = {
    # name: (E, M, topk, routing skew, local experts of an expert_map or None, activation, bias)
    "odd_e": (5, 33, 2, None, None, "silu", False),
    "topk1": (4, 17, 1, None, None, "silu", True),
    "empty_expert": (6, 20, 2, "half", None, "gelu", False),
    "expert_map": (8, 25, 3, None, 3, "silu", True),
    "swigluoai": (5, 19, 2, None, None, "swigluoai", True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("case", CASES)
def test_fused_experts_matches_reference(device, name, case):
    e, m, topk, skew, local, act, bias = CASES[case]
    if act == "swigluoai" and name != "mxfp4":
        pytest.skip("swigluoai is gpt-oss's (mxfp4)")
    h, i = DIMS[name]
    e_local = local or e
    moe, w13, w2, kw = layer4(e_local, h, i, name, device, bias=bias)
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    tw, ti = random_routing(m, e, topk, device=device, skew=skew)
    extra = {"activation": act}
    if local:  # experts 1, 3, 4 of 8 here; the rest remote
        emap = torch.full((e,), -1, dtype=torch.int32)
        emap[torch.tensor([1, 3, 4])] = torch.arange(local, dtype=torch.int32)
        extra["expert_map"] = emap.to(device)
    out = fused_moe.fused_experts(x, w13, w2, tw, ti, **kw, **extra)
    assert out.dtype == x.dtype and out.shape == x.shape
    ref = reference.fused_experts(x, w13, w2, tw, ti, **kw, **extra)
    err = rel_err(out, ref)
    assert err <= EXPERTS_TOL, f"{name} {case}: relative error {err:.3e}"
    unquantized = reference.fused_experts(x, moe["w13"], moe["w2"], tw, ti,
                                          w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"], **extra)
    err_model = rel_err(out, unquantized)
    print(f"{name} {case}: vs reference {err:.2e}, vs unquantized {err_model:.2e}")
    assert err_model < 0.3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g32"])
def test_fused_experts_in_runs_of_tokens(device, name, monkeypatch):
    """Past FUSED_MOE_CHAIN_BYTES the chain runs on runs of tokens (here 7 of
    33: a partial last run), each run's rows copied into the output once:
    the same result, and one copy a run where the profiler sees them."""
    h, i = DIMS[name]
    moe, w13, w2, kw = layer4(6, h, i, name, device, bias=True)
    m, topk = 33, 2
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    tw, ti = random_routing(m, 6, topk, device=device)
    whole = fused_moe.fused_experts(x, w13, w2, tw, ti, **kw)
    per_token = topk * 2 * max(h + 2 * i, 3 * i, i + h)  # bf16 bytes at the chain's peak
    monkeypatch.setenv("FUSED_MOE_CHAIN_BYTES", str(7 * per_token))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runs = fused_moe.fused_experts(x, w13, w2, tw, ti, **kw)
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")
    assert copies == 5, f"expected 5 runs of at most 7 tokens, saw {copies} copies"
    ref = reference.fused_experts(x, w13, w2, tw, ti, **kw)
    assert rel_err(runs, ref) <= EXPERTS_TOL
    assert rel_err(runs, whole) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g128-asym"])
def test_router_weight_on_input_and_fp32(device, name):
    h, i = DIMS[name]
    moe, w13, w2, kw = layer4(4, h, i, name, device, dtype=torch.float32)
    x = torch.randn(13, h, device=device)
    tw, ti = random_routing(13, 4, 1, device=device)
    out = fused_moe.fused_experts(x, w13, w2, tw, ti, apply_router_weight_on_input=True, **kw)
    ref = reference.fused_experts(x, w13, w2, tw, ti, apply_router_weight_on_input=True, **kw)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g128-asym"])
def test_no_tokens(device, name):
    h, i = DIMS[name]
    _, w13, w2, kw = layer4(4, h, i, name, device)
    x = torch.randn(0, h, device=device, dtype=torch.bfloat16)
    tw, ti = random_routing(0, 4, 2, device=device)
    assert fused_moe.fused_experts(x, w13, w2, tw, ti, **kw).shape == (0, h)
    off = torch.zeros(5, dtype=torch.int32, device=device)
    out = fused_moe.grouped_gemm(x, w13, off, w_scale=kw["w13_scale"], w_zp=kw["w13_zp"])
    assert out.shape == (0, 2 * i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g64"])
def test_deterministic(device, name):
    h, i = DIMS[name]
    _, w13, w2, kw = layer4(6, h, i, name, device)
    x = torch.randn(57, h, device=device, dtype=torch.bfloat16)
    tw, ti = random_routing(57, 6, 2, device=device)
    first = fused_moe.fused_experts(x, w13, w2, tw, ti, **kw)
    for _ in range(3):
        assert torch.equal(fused_moe.fused_experts(x, w13, w2, tw, ti, **kw), first)


# --- opcheck, compile ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g128-asym"])
def test_opcheck(device, name):
    h, i = DIMS[name]
    _, w13, w2, kw = layer4(4, h, i, name, device)
    x = torch.randn(9, h, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(9, 4, 2, device=device)
    off = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fused_moe.grouped_gemm.default,
                          (x, w13, off, None, None, kw["w13_scale"], None, None, kw["w13_zp"]))
    torch.library.opcheck(torch.ops.fused_moe.fused_experts.default,
                          (x, w13, w2, tw, ti, "silu", True, None, None, None, -1, False,
                           kw["w13_scale"], kw["w2_scale"], None, None, None, False,
                           kw["w13_zp"], kw["w2_zp"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g128-asym"])
def test_compile_fullgraph(device, name):
    h, i = DIMS[name]
    _, w13, w2, kw = layer4(4, h, i, name, device)
    x = torch.randn(9, h, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(9, 4, 2, device=device)
    fn = torch.compile(lambda *a: fused_moe.fused_experts(*a, **kw), fullgraph=True)
    assert torch.equal(fn(x, w13, w2, tw, ti), fused_moe.fused_experts(x, w13, w2, tw, ti, **kw))


# --- bad inputs ------------------------------------------------------------------------


# name: (the change to fused_experts' 4-bit kwargs, what the error says)
BAD = {
    "no scale": (lambda s, z: {"w13_scale": None}, "w13 needs w13_scale"),
    "odd group": (lambda s, z: {"w13_scale": s[:, :, :1].expand(-1, -1, 288).contiguous()},
                  "whole even number"),
    "scale experts": (lambda s, z: {"w13_scale": s[:2]}, "w13_scale must be"),
    "scale dtype": (lambda s, z: {"w13_scale": s.to(torch.int32)}, "w13_scale"),
    "group not dividing": (lambda s, z: {"w13_scale": s.repeat(1, 1, 3)[:, :, :7]}, "group size"),
    "zp shape": (lambda s, z: {"w13_zp": z[:, :, :1]}, "w13_zp"),
    "zp dtype": (lambda s, z: {"w13_zp": z.int()}, "w13_zp"),
    "a13_scale": (lambda s, z: {"a13_scale": torch.ones(1), "a2_scale": torch.ones(1)},
                  "weight-only"),
    "block_shape": (lambda s, z: {"block_shape": (128, 128)}, "weight-only"),
    "per_act_token_quant": (lambda s, z: {"per_act_token_quant": True}, "weight-only"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise(case):
    name = "int4-g64"
    h, i = DIMS[name]
    moe, w13, w2, kw = layer4(4, h, i, name, "cpu")
    kw = dict(kw, w13_zp=torch.randint(0, 16, kw["w13_scale"].shape, dtype=torch.uint8))
    x = torch.randn(5, h, dtype=torch.bfloat16)
    tw, ti = random_routing(5, 4, 2)
    change, message = BAD[case]
    change = change(kw["w13_scale"], kw["w13_zp"])
    with pytest.raises(RuntimeError, match=message):
        fused_moe.fused_experts(x, w13, w2, tw, ti, **dict(kw, **change))


def test_bad_inputs_mxfp4_and_grouped_gemm():
    h, i = DIMS["mxfp4"]
    _, w13, w2, kw = layer4(4, h, i, "mxfp4", "cpu")
    x = torch.randn(5, h, dtype=torch.bfloat16)
    tw, ti = random_routing(5, 4, 2)
    zp = torch.zeros(kw["w13_scale"].shape, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="w13_zp .*mxfp4"):
        fused_moe.fused_experts(x, w13, w2, tw, ti, **dict(kw, w13_zp=zp))
    with pytest.raises(RuntimeError, match="one exponent per 32"):
        fused_moe.fused_experts(x, w13, w2, tw, ti, **dict(kw, w13_scale=kw["w13_scale"][..., :3]))
    off = torch.tensor([0, 2, 2, 4, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="w: .*shape|w must"):
        fused_moe.grouped_gemm(x[:, :32], w13, off, w_scale=kw["w13_scale"])
    with pytest.raises(RuntimeError, match="a_scale and block_shape"):
        fused_moe.grouped_gemm(x, w13, off, a_scale=torch.ones(5, 1), w_scale=kw["w13_scale"])
    with pytest.raises(RuntimeError, match="w_zp"):
        fused_moe.grouped_gemm(x, x[None].expand(4, 5, h).contiguous(), off, w_zp=zp)
    with pytest.raises(RuntimeError, match="w13_zp and w2_zp"):
        fused_moe.fused_experts(x, torch.randn(4, 2 * i, h, dtype=torch.bfloat16),
                                torch.randn(4, h, i, dtype=torch.bfloat16), tw, ti, w13_zp=zp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxfp4", "int4-g64"])
def test_views_and_e8m0_scales(device, name):
    """Row-strided packed weights are read in place, scale views copied; e8m0
    scales as float8_e8m0fnu give the uint8 ones' result."""
    h, i = DIMS[name]
    _, w13, w2, kw = layer4(4, h, i, name, device)
    x = torch.randn(15, h, device=device, dtype=torch.bfloat16)
    tw, ti = random_routing(15, 4, 2, device=device)
    expected = fused_moe.fused_experts(x, w13, w2, tw, ti, **kw)
    wide = torch.zeros(4, 2 * i, w13.shape[2] + 16, dtype=torch.uint8, device=device)
    wide[..., :w13.shape[2]] = w13
    s13 = kw["w13_scale"]
    s13_view = s13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    views = dict(kw, w13_scale=s13_view)
    if name == "mxfp4":
        views["w2_scale"] = kw["w2_scale"].view(torch.float8_e8m0fnu)
    out = fused_moe.fused_experts(x, wide[..., :w13.shape[2]], w2, tw, ti, **views)
    assert torch.equal(out, expected)


# --- GPTQ / AWQ checkpoint layouts -------------------------------------------------------


def _words(codes):
    """codes [R, 8 C] -> int32 [R, C], code 8 c + i in bits 4 i .. 4 i + 3 (two's complement)."""
    c = codes.long().view(codes.shape[0], -1, 8)
    word = sum(c[..., i] << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@pytest.mark.parametrize("v2", [False, True])
def test_repack_gptq(v2):
    n, k, g = 24, 64, 32
    codes = torch.randint(0, 16, (k, n))            # GPTQ's [in, out]
    zeros = torch.randint(1, 15, (k // g, n))
    scales = torch.rand(k // g, n, dtype=torch.float16) + 0.1
    qweight = _words(codes.T.contiguous()).T          # packed along K: [K/8, N]
    qzeros = _words(zeros - (0 if v2 else 1))       # packed along N: [K/g, N/8]
    packed, s, z = quant.repack_gptq(qweight, scales, qzeros, v2=v2)
    expected = (codes.double() - zeros.repeat_interleave(g, 0)) \
        * scales.double().repeat_interleave(g, 0)  # w[k, n] as GPTQ defines it
    got = reference.dequantize_4bit(packed[None], s[None], z[None])[0]
    assert torch.equal(got, expected.T)
    packed, s, z = quant.repack_gptq(qweight, scales)  # symmetric: zero 8
    assert z is None
    assert torch.equal(reference.dequantize_4bit(packed[None], s[None])[0],
                       ((codes.double() - 8) * scales.double().repeat_interleave(g, 0)).T)


def test_repack_awq():
    n, k, g = 24, 64, 32
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(0, 16, (k // g, n))
    scales = torch.rand(k // g, n, dtype=torch.float16) + 0.1
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ's packing order within a word
    awq_order = lambda t: t.view(t.shape[0], -1, 8)[..., order].flatten(-2)  # noqa: E731
    packed, s, z = quant.repack_awq(_words(awq_order(codes)), scales, _words(awq_order(zeros)))
    expected = (codes.double() - zeros.repeat_interleave(g, 0)) \
        * scales.double().repeat_interleave(g, 0)
    assert torch.equal(reference.dequantize_4bit(packed[None], s[None], z[None])[0], expected.T)
