"""The FP8 ops (quantize_fp8, grouped_gemm and fused_experts on e4m3 weights)
against the float64 reference that emulates each scheme, on CPU and CUDA."""

import os

import pytest
import torch

import fused_moe
from fused_moe import quant, reference
from conftest import random_moe, random_routing, rel_err

FP8 = torch.float8_e4m3fn
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEMM_TOL = 1e-2
EXPERTS_TOL = 3.5e-2

# name -> (QuantConfig, fused_experts kwargs besides the scales, static activation scales)
SCHEMES = {
    "block": (quant.QuantConfig.fp8_block(), {"block_shape": (128, 128)}, False),
    "block64": (quant.QuantConfig.fp8_block((64, 32)), {"block_shape": (64, 32)}, False),
    "channel_token": (quant.QuantConfig.fp8_channel(), {"per_act_token_quant": True}, False),
    "channel_static": (quant.QuantConfig.fp8_channel("static"), {}, True),
    "tensor_static": (quant.QuantConfig.fp8_tensor("static"), {}, True),
    "tensor_dynamic": (quant.QuantConfig.fp8_tensor("dynamic"), {}, False),
}


def same_bits(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


# --- quantize_fp8 -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_size", [128, 64, 7, 0, -1])
@pytest.mark.parametrize("rows,cols", [(1, 128), (37, 300), (5, 7), (0, 128)])
def test_quantize_matches_reference(device, dtype, group_size, rows, cols):
    x = (torch.randn(rows, cols) * 3).to(dtype).to(device)
    q, s = fused_moe.quantize_fp8(x, group_size)
    rq, rs = reference.quantize_fp8(x, group_size)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s.cpu(), rs.cpu())
    assert same_bits(q, rq)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_static_saturates(device):
    x = torch.randn(20, 96, device=device, dtype=torch.bfloat16)
    scale = torch.tensor([x.float().abs().max().item() / 1000], device=device)  # overflows 448
    q, s = fused_moe.quantize_fp8(x, 0, scale)
    assert s.shape == (1, 1) and s.item() == scale.item()
    assert q.float().abs().max().item() == 448.0
    assert same_bits(q, reference.quantize_fp8(x, 0, scale)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_zero_row_and_strided(device):
    base = torch.randn(9, 400, device=device, dtype=torch.bfloat16)
    x = base[:, 16:16 + 256]  # row-strided view
    x[3] = 0  # an all-zero row: its scales are eps / 448, its values 0
    q, s = fused_moe.quantize_fp8(x, 128)
    assert torch.all(s[3] == torch.tensor(1e-10 / 448, dtype=torch.float32))
    assert torch.all(q[3].float() == 0)
    rq, rs = reference.quantize_fp8(x.contiguous(), 128)
    assert torch.equal(s.cpu(), rs.cpu()) and same_bits(q, rq)


# --- grouped_gemm -------------------------------------------------------------------


def fp8_gemm_inputs(e, n, k, rows, device, config, act_group, gen_counts=None):
    w = torch.randn(e, n, k) / k**0.5
    q, ws = quant.quantize_weight(w, config)
    a = torch.randn(rows, k, dtype=torch.bfloat16)
    aq, as_ = fused_moe.quantize_fp8(a, act_group)
    counts = torch.multinomial(torch.ones(e), rows, replacement=True).bincount(minlength=e)
    if e > 2:
        counts[1] += counts[2]
        counts[2] = 0  # an expert with no rows
    off = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    return [t.to(device) for t in (aq, as_, q, ws, off)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,act_group", [("block", 128), ("block64", 32), ("channel_token", 0),
                                              ("tensor_static", -1)])
@pytest.mark.parametrize("e,n,k,rows", [(1, 128, 128, 5), (6, 72, 200, 61), (8, 256, 384, 300)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_fp8(device, scheme, act_group, e, n, k, rows, out_dtype):
    config, kwargs, _ = SCHEMES[scheme]
    aq, as_, q, ws, off = fp8_gemm_inputs(e, n, k, rows, device, config, act_group)
    bias = (torch.randn(e, n) * 0.1).to(out_dtype).to(device)
    block = kwargs.get("block_shape")
    out = fused_moe.grouped_gemm(aq, q, off, bias, as_, ws, block, out_dtype)
    ref = reference.grouped_gemm(aq, q, off, bias, a_scale=as_, w_scale=ws, block_shape=block)
    assert out.dtype == out_dtype and out.shape == (rows, n)
    assert rel_err(out, ref) <= GEMM_TOL


def test_cpu_fp8_weights_every_code():
    """Every e4m3fn code as the CPU GEMM reads it: an identity of rows times
    weights of every code gives code value * scale in float32, bit for bit
    (the vector and scalar decoders alike), and NaN for 0x7f and 0xff."""
    k, scale = 128, 0.37
    codes = torch.arange(256, dtype=torch.int32)
    finite = codes[(codes & 0x7F) != 0x7F]  # 254 codes
    rows = torch.zeros(3, k, dtype=torch.int32)
    rows[0], rows[1, :126] = finite[:128], finite[128:]
    rows[2, 0::2], rows[2, 1::2] = 0x7F, 0xFF
    w = rows.to(torch.uint8).view(FP8)[None]
    a = torch.eye(k).to(FP8)
    off = torch.tensor([0, k], dtype=torch.int32)
    w_scale = torch.full((1, 1, 1), scale)
    a_scale = torch.ones(k, 1)
    out = fused_moe.grouped_gemm(a, w, off, None, a_scale, w_scale, (128, 128), torch.float32).T
    expected = rows[:2].to(torch.uint8).view(FP8).float() * torch.tensor(scale)
    assert torch.equal(out[:2], expected)
    assert out[2].isnan().all()


# --- fused_experts ------------------------------------------------------------------


def calibrated_scales(ws, x):
    """Static activation scales as a calibration pass makes them: the amax of
    the first GEMM's inputs and of every expert's activations on them, / 448."""
    xf = x.double().cpu()
    act = torch.stack([reference.activation(xf @ w.double().T, "silu") for w in ws["w13"]])
    return (torch.tensor([xf.abs().max().item() / 448]), torch.tensor([act.abs().max().item() / 448]))


def fp8_layer(e, h, i, scheme, device, bias=False, x=None):
    """(q13, q2, fused_experts kwargs, the float weights on `device`); static
    schemes calibrate their activation scales on x."""
    config, kwargs, static = SCHEMES[scheme]
    ws = random_moe(e, h, i, torch.float32, bias=bias)
    q13, s13 = quant.quantize_weight(ws["w13"], config)
    q2, s2 = quant.quantize_weight(ws["w2"], config)
    kw = dict(kwargs, w13_scale=s13.to(device), w2_scale=s2.to(device))
    if static:
        calibration = x if x is not None else torch.randn(64, h)
        a13, a2 = calibrated_scales(ws, calibration)
        kw.update(a13_scale=a13.to(device), a2_scale=a2.to(device))
    for name in ("w13_bias", "w2_bias"):
        if name in ws:
            kw[name] = ws[name].to(torch.bfloat16).to(device)
    return q13.to(device), q2.to(device), kw, {k: v.to(device) for k, v in ws.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("m,e,topk,h,i", [(1, 8, 2, 256, 128), (37, 8, 2, 384, 200),
                                          (64, 1, 1, 128, 256), (130, 16, 4, 256, 136)])
def test_fused_experts_fp8(device, scheme, m, e, topk, h, i):
    x = torch.randn(m, h, dtype=torch.bfloat16, device=device)
    q13, q2, kw, ws = fp8_layer(e, h, i, scheme, device, bias=m == 37, x=x)
    tw, ti = random_routing(m, e, topk, device=device)
    out = fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)
    ref = reference.fused_experts(x, q13, q2, tw, ti, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= EXPERTS_TOL
    # The quantized model stays near the unquantized one.
    exact = reference.fused_experts(x, ws["w13"], ws["w2"], tw, ti,
                                    w13_bias=kw.get("w13_bias"), w2_bias=kw.get("w2_bias"))
    assert rel_err(out, exact) <= 0.12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel_token", "tensor_static"])
def test_fused_experts_fp8_expert_map_and_skew(device, scheme):
    e_global, e_local, m, h, i = 16, 4, 45, 256, 128
    q13, q2, kw, _ = fp8_layer(e_local, h, i, scheme, device)
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[4:8] = torch.arange(4, dtype=torch.int32)
    tw, ti = random_routing(m, e_global, 3, device=device, skew="one")
    ti[:, 0] = 5  # every token's first choice on one local expert
    x = torch.randn(m, h, dtype=torch.bfloat16, device=device)
    kw = dict(kw, expert_map=expert_map.to(device), global_num_experts=e_global)
    out = fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)
    ref = reference.fused_experts(x, q13, q2, tw, ti, **kw)
    assert rel_err(out, ref) <= EXPERTS_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_fused_experts_fp8_router_weight_on_input_and_empty(device):
    q13, q2, kw, _ = fp8_layer(8, 256, 128, "block", device)
    x = torch.randn(23, 256, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(23, 8, 1, device=device)
    out = fused_moe.fused_experts(x, q13, q2, tw, ti, apply_router_weight_on_input=True, **kw)
    ref = reference.fused_experts(x, q13, q2, tw, ti, apply_router_weight_on_input=True, **kw)
    assert rel_err(out, ref) <= EXPERTS_TOL
    empty = fused_moe.fused_experts(x[:0], q13, q2, tw[:0], ti[:0], **kw)
    assert empty.shape == (0, 256)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_deterministic(device):
    q13, q2, kw, _ = fp8_layer(8, 256, 128, "block", device)
    x = torch.randn(77, 256, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(77, 8, 2, device=device)
    first = fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)
    assert torch.equal(first, fused_moe.fused_experts(x, q13, q2, tw, ti, **kw))
    # A token's result does not depend on the batch around it.
    alone = fused_moe.fused_experts(x[5:6], q13, q2, tw[5:6], ti[5:6], **kw)
    assert torch.equal(alone, first[5:6])


# --- errors -------------------------------------------------------------------------


def test_fp8_errors_name_the_argument():
    q13, q2, kw, _ = fp8_layer(4, 128, 128, "block", "cpu")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    tw, ti = random_routing(3, 4, 2)
    with pytest.raises(RuntimeError, match="w13_scale"):
        fused_moe.fused_experts(x, q13, q2, tw, ti, w2_scale=kw["w2_scale"], block_shape=(128, 128))
    with pytest.raises(RuntimeError, match="w2_scale"):
        fused_moe.fused_experts(x, q13, q2, tw, ti, w13_scale=kw["w13_scale"], block_shape=(128, 128))
    with pytest.raises(RuntimeError, match="w13_scale must have shape"):
        fused_moe.fused_experts(x, q13, q2, tw, ti, **dict(kw, w13_scale=kw["w13_scale"][:, :1]))
    with pytest.raises(RuntimeError, match="w2_scale must be Float"):
        fused_moe.fused_experts(x, q13, q2, tw, ti, **dict(kw, w2_scale=kw["w2_scale"].half()))
    with pytest.raises(RuntimeError, match="block_shape"):
        fused_moe.fused_experts(x, q13, q2, tw, ti, **dict(kw, block_shape=(128,)))
    with pytest.raises(RuntimeError, match="w13_scale"):
        fused_moe.fused_experts(x, q13.bfloat16(), q2.bfloat16(), tw, ti, **kw)
    with pytest.raises(RuntimeError, match="a_scale"):
        fused_moe.grouped_gemm(q13[0, :4].contiguous(), q13, torch.tensor([0, 4, 4, 4, 4]).int(),
                               None, None, kw["w13_scale"], (128, 128))
    with pytest.raises(RuntimeError, match="group_size"):
        fused_moe.quantize_fp8(x, -2)
    with pytest.raises(RuntimeError, match="one element"):
        fused_moe.quantize_fp8(x, 0, torch.ones(2))


# --- opcheck, compile, CUDA graphs --------------------------------------------------


# torch's schema check compares inputs before and after with a multiply, which
# e4m3 tensors lack: for ops that take them, the other checks run, and the
# test sees for itself that the inputs stay as they were.
NO_SCHEMA_CHECK = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_fp8_inputs(op, args):
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    torch.library.opcheck(op, args, test_utils=NO_SCHEMA_CHECK)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(same_bits(a, b) for a, b in zip(before, after)), "an op changed its input"


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_opcheck(device):
    q13, q2, kw, _ = fp8_layer(4, 128, 128, "block", device)
    x = torch.randn(9, 128, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(9, 4, 2, device=device)
    torch.library.opcheck(torch.ops.fused_moe.quantize_fp8.default, (x, 128, None))
    torch.library.opcheck(torch.ops.fused_moe.quantize_fp8.default,
                          (x, 0, torch.tensor([0.01], device=device)))
    aq, as_ = fused_moe.quantize_fp8(x, 128)
    off = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32, device=device)
    opcheck_fp8_inputs(torch.ops.fused_moe.grouped_gemm.default,
                       (aq, q13, off, None, as_, kw["w13_scale"], [128, 128], torch.bfloat16))
    opcheck_fp8_inputs(torch.ops.fused_moe.fused_experts.default,
                       (x, q13, q2, tw, ti, "silu", True, None, None, None, -1, False,
                        kw["w13_scale"], kw["w2_scale"], None, None, [128, 128], False))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_compile_fullgraph(device):
    q13, q2, kw, _ = fp8_layer(4, 128, 128, "block", device)
    x = torch.randn(9, 128, dtype=torch.bfloat16, device=device)
    tw, ti = random_routing(9, 4, 2, device=device)
    fn = torch.compile(lambda *a: fused_moe.fused_experts(*a, **kw), fullgraph=True)
    assert torch.equal(fn(x, q13, q2, tw, ti), fused_moe.fused_experts(x, q13, q2, tw, ti, **kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["block", "channel_token", "tensor_dynamic"])
def test_fp8_cuda_graph_replay(scheme):
    q13, q2, kw, _ = fp8_layer(8, 256, 128, scheme, "cuda")
    x = torch.randn(40, 256, dtype=torch.bfloat16, device="cuda")
    tw, ti = random_routing(40, 8, 2, device="cuda")
    fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)  # warm up outside the capture
    check_replay_with_new_inputs(x, tw, ti, q13, q2, kw)


def check_replay_with_new_inputs(x, tw, ti, q13, q2, kw):
    """fused_experts captured on (x, tw, ti) replays with fresh values in them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)
    x2 = torch.randn_like(x)
    tw2, ti2 = random_routing(x.shape[0], q13.shape[0], tw.shape[1], device="cuda")
    x.copy_(x2), tw.copy_(tw2), ti.copy_(ti2)
    graph.replay()
    assert torch.equal(out, fused_moe.fused_experts(x2, q13, q2, tw2, ti2, **kw))


def _sm90_configs(prefix):
    """The built sm90 configurations of one input kind (configs.cmake): fp8_
    (block scales) or rowcol_ (row/col scales)."""
    from fused_moe.__main__ import build_info

    fields = dict(f.split("=", 1) for f in build_info().split(" ") if "=" in f)
    return [n for n in fields.get("sm90_configs", "").split(",") if n.startswith(prefix)]


ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", _sm90_configs("fp8_") + ["fallback"])
@pytest.mark.parametrize("e,n,k,rows", [(1, 128, 128, 5), (8, 256, 384, 300), (64, 512, 2880, 700),
                                        (6, 2880, 256, 90)])
def test_grouped_gemm_fp8_each_config(monkeypatch, config, e, n, k, rows):
    monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)
    aq, as_, q, ws, off = fp8_gemm_inputs(e, n, k, rows, "cuda", quant.QuantConfig.fp8_block(), 128)
    out = fused_moe.grouped_gemm(aq, q, off, None, as_, ws, (128, 128))
    ref = reference.grouped_gemm(aq, q, off, None, a_scale=as_, w_scale=ws, block_shape=(128, 128))
    assert rel_err(out, ref) <= GEMM_TOL
    assert torch.all(out[off[-1]:] == 0)


# The row/col scale forms of the channel and tensor schemes: a quantized per
# row (dynamic per token), per tensor (dynamic) or with a static scale; w per
# output channel ([E, N]) or per expert ([E]). Every pairing runs.
A_FORMS = ["row", "tensor", "static"]
W_FORMS = {"channel": quant.QuantConfig.fp8_channel(), "expert": quant.QuantConfig.fp8_tensor()}
# (E, N, K, rows per expert): one expert; rows on either side of the 32-, 64-
# and 128-row tiles (N and K partial tiles too); a skewed split with empty
# experts and N = 2880 (not a multiple of 128 or 256); K % 16 != 0, which every
# configuration leaves to the fallback.
ROWCOL_SHAPES = [pytest.param(1, 256, 128, [5], id="one_expert"),
                 pytest.param(10, 200, 272, [0, 1, 31, 33, 64, 65, 127, 129, 200, 257], id="tiles"),
                 pytest.param(6, 2880, 512, [0, 90, 3, 0, 400, 17], id="skewed"),
                 pytest.param(4, 72, 200, [7, 0, 30, 2], id="fallback_shape")]


def rowcol_inputs(e, n, k, counts, a_form, w_form, tail=3):
    """(aq, a_scale, q, w_scale, offsets) on the GPU; `tail` rows past offsets[E]."""
    q, ws = quant.quantize_weight(torch.randn(e, n, k) / k**0.5, W_FORMS[w_form])
    a = torch.randn(sum(counts) + tail, k, dtype=torch.bfloat16)
    if a_form == "static":  # a calibration that saw larger values than these
        static = quant.scale_of(a.float().abs().amax() * 1.25).reshape(1)
        aq, as_ = fused_moe.quantize_fp8(a, -1, static)
    else:
        aq, as_ = fused_moe.quantize_fp8(a, 0 if a_form == "row" else -1)
    off = torch.tensor([0] + counts).cumsum(0).int()
    return [t.cuda() for t in (aq, as_, q, ws, off)]


@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", _sm90_configs("rowcol_") + ["default"])
@pytest.mark.parametrize("a_form", A_FORMS)
@pytest.mark.parametrize("w_form", sorted(W_FORMS))
@pytest.mark.parametrize("e,n,k,counts", ROWCOL_SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grouped_gemm_fp8_rowcol_each_config(monkeypatch, config, a_form, w_form, e, n, k, counts,
                                             bias, out_dtype):
    if config == "default":
        monkeypatch.delenv("FUSED_MOE_GEMM_CONFIG", raising=False)
    else:
        monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)
    aq, as_, q, ws, off = rowcol_inputs(e, n, k, counts, a_form, w_form)
    b = (torch.randn(e, n, device="cuda") * 0.1).to(out_dtype) if bias else None
    # A NaN-filled block of out's size left in the caching allocator: rows
    # the kernel fails to write show up.
    torch.full((aq.shape[0], n), float("nan"), dtype=out_dtype, device="cuda")
    out = fused_moe.grouped_gemm(aq, q, off, b, as_, ws, None, out_dtype)
    ref = reference.grouped_gemm(aq, q, off, b, a_scale=as_, w_scale=ws)
    assert out.dtype == out_dtype and out.shape == (aq.shape[0], n)
    assert rel_err(out, ref) <= GEMM_TOL
    assert torch.all(out[off[-1]:] == 0)


@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", _sm90_configs("rowcol_"))
@pytest.mark.parametrize("a_form,w_form", [("row", "channel"), ("tensor", "expert")])
def test_grouped_gemm_fp8_rowcol_graph_replay(monkeypatch, config, a_form, w_form):
    # Scale pointers are built on the device: a replay with new rows, scales
    # and routing of the same shapes reads the new ones.
    monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)
    e, n, k = 8, 512, 256
    aq, as_, q, ws, off = rowcol_inputs(e, n, k, [75] * e, a_form, w_form, tail=0)
    fused_moe.grouped_gemm(aq, q, off, None, as_, ws)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.grouped_gemm(aq, q, off, None, as_, ws)
    counts = [0, 300, 1, 0, 150, 100, 49, 0]
    aq2, as2, _, _, off2 = rowcol_inputs(e, n, k, counts, a_form, w_form, tail=0)
    for dst, src in ((aq, aq2), (as_, as2), (off, off2)):
        dst.copy_(src)
    graph.replay()
    ref = reference.grouped_gemm(aq, q, off, None, a_scale=as_, w_scale=ws)
    assert rel_err(out, ref) <= GEMM_TOL


@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", _sm90_configs("rowcol_") + _sm90_configs("fp8_")[:1])
@pytest.mark.parametrize("scheme", ["block", "channel_token", "tensor_static"])
def test_fused_experts_fp8_forced_config(monkeypatch, config, scheme):
    # A forced configuration runs the GEMMs of its own input kind; the others
    # keep their heuristic (a row/col one forced on block scales and back).
    monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)
    m, e, topk, h, i = 130, 16, 4, 256, 144
    x = torch.randn(m, h, dtype=torch.bfloat16, device="cuda")
    q13, q2, kw, _ = fp8_layer(e, h, i, scheme, "cuda", bias=True, x=x)
    tw, ti = random_routing(m, e, topk, device="cuda")
    out = fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)
    ref = reference.fused_experts(x, q13, q2, tw, ti, **kw)
    assert rel_err(out, ref) <= EXPERTS_TOL


# --- the FP8 decode kernels (CUDA, sm_89 on) -----------------------------------------

HAS_FP8_MMA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def cuda_kernels_run(fn):
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.skipif(not HAS_FP8_MMA, reason="needs a GPU with FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize("scheme", ["block", "channel_token", "channel_static", "tensor_static"])
@pytest.mark.parametrize("m,e,topk,h,i,act,bias", [
    (1, 8, 2, 256, 128, "silu", False),
    (3, 8, 4, 320, 192, "silu", True),     # partial 128-blocks along both K
    (1, 4, 2, 2880, 2880, "swigluoai", True),  # gpt-oss: 22.5 blocks of 128
    (5, 4, 2, 192, 256, "gelu", False),    # plain (not gated) activations
    (2, 6, 1, 128, 128, "relu2", False),
])
def test_fp8_decode_kernels(monkeypatch, scheme, m, e, topk, h, i, act, bias):
    """The FP8 decode kernels (forced) against the emulation of the scheme,
    and near the chain; the profiler sees them run."""
    gated = act in ("silu", "swigluoai")
    x = torch.randn(m, h, dtype=torch.bfloat16, device="cuda")
    q13, q2, kw, _ = fp8_layer(e, h, i, scheme, "cuda", bias=bias, x=x.cpu().float())
    if not gated:  # the first half of each gated w13 (a whole number of scale blocks)
        q13 = q13[:, :i].contiguous()
        s13 = kw["w13_scale"]
        if s13.dim() >= 2 and s13.shape[1] > 1:
            kw["w13_scale"] = s13[:, :s13.shape[1] // 2].contiguous()
        if bias:
            kw["w13_bias"] = kw["w13_bias"][:, :i].contiguous()
    tw, ti = random_routing(m, e, topk, device="cuda")
    call = lambda: fused_moe.fused_experts(x, q13, q2, tw, ti, activation=act,
                                           is_act_and_mul=gated, **kw)
    monkeypatch.setenv("FUSED_MOE_DECODE", "1")
    assert any("fp8_up_kernel" in n for n in cuda_kernels_run(call))
    out = call()
    ref = reference.fused_experts(x, q13, q2, tw, ti, activation=act, is_act_and_mul=gated, **kw)
    assert rel_err(out, ref) <= EXPERTS_TOL
    monkeypatch.setenv("FUSED_MOE_DECODE", "0")
    assert rel_err(out, call()) <= EXPERTS_TOL  # two roundings of the same scheme


@pytest.mark.skipif(not HAS_FP8_MMA, reason="needs a GPU with FP8 tensor cores (sm_89+)")
def test_fp8_decode_expert_map_and_router_weight_on_input(monkeypatch):
    """Slots of other ranks contribute nothing (a token with none gives zeros);
    the router weight on the input scales x before it is quantized."""
    monkeypatch.setenv("FUSED_MOE_DECODE", "1")
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    q13, q2, kw, _ = fp8_layer(4, 256, 128, "block", "cuda")
    expert_map = torch.tensor([-1, 0, 1, -1, 2, 3, -1, -1], dtype=torch.int32, device="cuda")
    tw, ti = random_routing(4, 8, 2, device="cuda")
    ti[0] = torch.tensor([0, 3], device="cuda")  # both slots remote
    out = fused_moe.fused_experts(x, q13, q2, tw, ti, expert_map=expert_map, **kw)
    ref = reference.fused_experts(x, q13, q2, tw, ti, expert_map=expert_map, **kw)
    assert torch.all(out[0] == 0) and rel_err(out, ref) <= EXPERTS_TOL
    tw1, ti1 = random_routing(4, 4, 1, device="cuda")
    out = fused_moe.fused_experts(x, q13, q2, tw1, ti1, apply_router_weight_on_input=True, **kw)
    ref = reference.fused_experts(x, q13, q2, tw1, ti1, apply_router_weight_on_input=True, **kw)
    assert rel_err(out, ref) <= EXPERTS_TOL


@pytest.mark.skipif(not HAS_FP8_MMA, reason="needs a GPU with FP8 tensor cores (sm_89+)")
def test_fp8_decode_is_the_default_for_one_token_and_replays():
    """One token takes the FP8 decode kernels by default, and they replay in a CUDA graph."""
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    q13, q2, kw, _ = fp8_layer(8, 512, 256, "block", "cuda")
    tw, ti = random_routing(1, 8, 2, device="cuda")
    assert any("fp8_up_kernel" in n for n in cuda_kernels_run(
        lambda: fused_moe.fused_experts(x, q13, q2, tw, ti, **kw)))
    check_replay_with_new_inputs(x, tw, ti, q13, q2, kw)
