"""torch.ops.fused_moe.grouped_gemm with 4-bit weights (mxfp4 and int4) on the
GPU, against a float64 dequantization written here from the op contract: w is
uint8 [E, N, K/2], two codes a byte along K (the even k in the low nibble);
mxfp4: value = e2m1(code) * 2^(s - 127), s an e8m0 byte per 32 columns; int4:
value = (code - z) * s per group of g columns, z the zero point (8 without
zero points). Partial row and column tiles, empty experts, rows past
offsets[E], K = 2880 (gpt-oss), groups that do not fill a 16-code pack, K not
a multiple of the K tile, unaligned pointers; the default dispatch, the
fallback forced, each tile of the tensor-core kernel forced, and (on sm_90) a
16-bit sm90 configuration forced, which 4-bit weights must not take."""

import pytest
import torch

import fused_moe  # noqa: F401  (registers torch.ops.fused_moe)
from conftest import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _sm90_16bit_configs():
    """The built sm90 configurations of 16-bit inputs (configs.cmake rows
    without the fp8_/rowcol_ prefixes); forcing one must leave 4-bit weights
    on the fallback."""
    if not ON_SM90:
        return []
    from fused_moe.__main__ import build_info

    fields = dict(f.split("=", 1) for f in build_info().split(" ") if "=" in f)
    names = [n for n in fields.get("sm90_configs", "").split(",") if n]
    return [n for n in names if not n.startswith(("fp8_", "rowcol_"))][:1]


# The tensor-core kernel's tiles (w4_mma.cu), each forced: kTok rows of one
# expert a block.
W4_TILES = ["w4_tok8", "w4_tok16", "w4_tok32", "w4_tok64"]
# On sm_90: weights dequantized to 16 bits a few experts at a time, then the
# sm90 16-bit kernels (the path of many rows per expert).
W4_DEQUANT = ["w4_dequant"] if ON_SM90 else []
CONFIGS = ["default", "fallback"] + W4_TILES + W4_DEQUANT + _sm90_16bit_configs()

# e2m1: sign in bit 3, magnitudes of codes 0..7.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E2M1 = torch.cat([E2M1, -E2M1])


def use_config(monkeypatch, config):
    if config == "default":
        monkeypatch.delenv("FUSED_MOE_GEMM_CONFIG", raising=False)
    else:
        monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)


def pack(codes):
    """Codes [..., K] (0..15) -> bytes [..., K/2], the even k in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).contiguous()


def codes_of(packed):
    """Bytes [..., K/2] -> codes [..., K] as int64, read back nibble by nibble."""
    lo, hi = (packed & 15).long(), (packed >> 4).long()
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize(packed, scale, zp, group):
    """The contract's value of every element, in float64: [E, N, K]."""
    codes = codes_of(packed)
    k = codes.shape[-1]
    if scale.dtype == torch.uint8:  # mxfp4: e8m0 exponents, one per 32 columns
        s = torch.exp2(scale.double() - 127.0)
        s[scale == 255] = float("nan")
        return E2M1.to(codes.device)[codes] * s.repeat_interleave(32, -1)[..., :k]
    z = 8.0 if zp is None else zp.double().repeat_interleave(group, -1)
    return (codes.double() - z) * scale.double().repeat_interleave(group, -1)


def quantized_weights(scheme, e, n, k, scale_dtype=torch.bfloat16):
    """(packed uint8 [E, N, K/2], scale, zp or None, group) for scheme "mxfp4"
    or "int4-g<g>[-asym]": random codes, scales that keep an output row of
    N(0, 1) inputs near unit size (in fp16's range too)."""
    codes = torch.randint(0, 16, (e, n, k), device="cuda", dtype=torch.uint8)
    if scheme == "mxfp4":
        group = 32
        # 2^-9 .. 2^-5 times magnitudes up to 6.
        scale = torch.randint(118, 123, (e, n, k // group), device="cuda", dtype=torch.uint8)
        return pack(codes), scale, None, group
    group = int(scheme.split("-")[1][1:])
    scale = (torch.rand(e, n, k // group, device="cuda") * 0.5 + 0.5) / (4 * k**0.5)
    zp = None
    if scheme.endswith("-asym"):
        zp = torch.randint(0, 16, (e, n, k // group), device="cuda", dtype=torch.uint8)
    return pack(codes), scale.to(scale_dtype), zp, group


def offsets_of(counts):
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).cuda()


def reference(a, w, offsets, bias):
    off = offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64, device=a.device)
    for e in range(w.shape[0]):
        if off[e + 1] > off[e]:
            y = a[off[e]:off[e + 1]].double() @ w[e].T
            out[off[e]:off[e + 1]] = y if bias is None else y + bias[e].double()
    return out


def run(a, packed, offsets, bias, scale, zp):
    # A NaN-filled block of out's size left in the caching allocator: rows the
    # kernel fails to write show up as NaN instead of lucky zeros.
    torch.full((a.shape[0], packed.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
    return torch.ops.fused_moe.grouped_gemm(a, packed, offsets, bias, None, scale, None, None, zp)


def check(out, a, packed, offsets, bias, scale, zp, group, what):
    end = int(offsets[-1])
    assert out.shape == (a.shape[0], packed.shape[1]) and out.dtype == a.dtype, what
    assert (out[end:] == 0).all(), f"{what}: rows past offsets[E]={end} are not zero"
    if end > 0:
        ref = reference(a, dequantize(packed, scale, zp, group), offsets, bias)[:end]
        err = rel_err(out[:end], ref)
        assert err <= TOL[a.dtype], f"{what}: relative error {err:.2e} > {TOL[a.dtype]:.0e}"


SCHEMES = ["mxfp4", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "int4-g128-asym"]
# (N, K, rows per expert): N partial in the 128-wide tile (200, 2880, 700),
# experts' last row tiles partial (64-row tiles), empty experts, one row.
# K = 2880 (gpt-oss: 90 groups of 32) is no multiple of 128; 2816 is.
SHAPES = [
    (256, 128, [5, 0, 64, 1]),
    (200, 384, [0, 70, 130, 3, 0, 1]),
    (2880, 2880, [37, 0, 65, 1]),
    (700, 2880, [1]),
    (512, 2816, [0, 0, 129, 2]),
]

CASES = [
    pytest.param(scheme, dtype, n, k, counts, config,
                 id=f"{scheme}-{str(dtype)[6:]}-{n}x{k}-E{len(counts)}-{config}")
    for scheme in SCHEMES
    for dtype in (torch.bfloat16, torch.float16)
    for n, k, counts in SHAPES
    if scheme == "mxfp4" or k % int(scheme.split("-")[1][1:]) == 0
    for config in CONFIGS
]


@pytest.mark.parametrize("scheme,dtype,n,k,counts,config", CASES)
def test_matches_reference(scheme, dtype, n, k, counts, config, monkeypatch):
    use_config(monkeypatch, config)
    e = len(counts)
    packed, scale, zp, group = quantized_weights(scheme, e, n, k, scale_dtype=dtype)
    offsets = offsets_of(counts)
    rows = int(offsets[-1]) + 3  # rows past offsets[E]: zero
    a = torch.randn(rows, k, device="cuda").to(dtype)
    bias = torch.randn(e, n, device="cuda").to(dtype) * 0.1
    for b in (None, bias):
        out = run(a, packed, offsets, b, scale, zp)
        check(out, a, packed, offsets, b, scale, zp, group, f"{config}, bias={b is not None}")


@pytest.mark.skipif(not ON_SM90, reason="the dequantized path is sm_90's")
@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g64-asym"])
def test_dequantized_one_expert_a_step(scheme, monkeypatch):
    """A workspace of one expert: each step multiplies one expert's rows, and
    only the last zeroes the rows past offsets[E]; rows of every expert
    survive the later steps."""
    use_config(monkeypatch, "w4_dequant")
    monkeypatch.setenv("FUSED_MOE_W4_DEQUANT_BYTES", "1")
    counts = [40, 0, 300, 7, 129]
    packed, scale, zp, group = quantized_weights(scheme, len(counts), 256, 512)
    offsets = offsets_of(counts)
    a = torch.randn(int(offsets[-1]) + 5, 512, device="cuda").to(torch.bfloat16)
    bias = torch.randn(len(counts), 256, device="cuda").to(torch.bfloat16)
    out = run(a, packed, offsets, bias, scale, zp)
    check(out, a, packed, offsets, bias, scale, zp, group, "one expert a step")


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_scale_dtypes(scale_dtype, dtype, asym):
    counts = [3, 0, 80]
    packed, scale, zp, group = quantized_weights(f"int4-g64{'-asym' if asym else ''}", 3, 384, 640,
                                                 scale_dtype=scale_dtype)
    offsets = offsets_of(counts)
    a = torch.randn(int(offsets[-1]), 640, device="cuda").to(dtype)
    out = run(a, packed, offsets, None, scale, zp)
    check(out, a, packed, offsets, None, scale, zp, group, f"scales {scale_dtype}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("k,group", [(48, 48), (80, 16), (72, 8), (90, 6), (2, 2), (96, 32)])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_odd_groups(k, group, asym, config, monkeypatch):
    # Groups smaller than a 16-code pack (one scale a byte or a few), K not a
    # multiple of the 32-wide K tile or of 16 (byte loads), K = 2.
    use_config(monkeypatch, config)
    counts = [0, 65, 2]
    packed, scale, zp, _ = quantized_weights(f"int4-g{group}{'-asym' if asym else ''}", 3, 136, k)
    offsets = offsets_of(counts)
    a = torch.randn(int(offsets[-1]) + 1, k, device="cuda").bfloat16()
    bias = torch.randn(3, 136, device="cuda").bfloat16()
    out = run(a, packed, offsets, bias, scale, zp)
    check(out, a, packed, offsets, bias, scale, zp, group, f"K={k}, g={group}")


@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g32-asym"])
def test_fp32_activations(scheme):
    # fp32 a: fp32 FMAs on weights dequantized to fp32 (exact for mxfp4).
    counts = [2, 0, 67]
    packed, scale, zp, group = quantized_weights(scheme, 3, 160, 2880, scale_dtype=torch.float32)
    offsets = offsets_of(counts)
    a = torch.randn(int(offsets[-1]) + 2, 2880, device="cuda")
    bias = torch.randn(3, 160, device="cuda")
    out = run(a, packed, offsets, bias, scale, zp)
    check(out, a, packed, offsets, bias, scale, zp, group, scheme)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g32-asym"])
def test_unaligned_pointers(scheme, config, monkeypatch):
    # a 2 bytes and w 1 byte off alignment: the loads of bytes and elements one
    # by one, in every configuration.
    use_config(monkeypatch, config)
    e, n, k, counts = 4, 256, 2880, [0, 100, 1, 64]
    packed, scale, zp, group = quantized_weights(scheme, e, n, k)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    shifted.copy_(packed.flatten())
    packed = shifted.view(packed.shape)
    offsets = offsets_of(counts)
    rows = int(offsets[-1]) + 2
    a = torch.randn(rows * k + 1, device="cuda").bfloat16()[1:].view(rows, k)
    out = run(a, packed, offsets, None, scale, zp)
    check(out, a, packed, offsets, None, scale, zp, group, config)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="no float8_e8m0fnu in this torch")
def test_mxfp4_e8m0fnu_scales():
    # The scales as float8_e8m0fnu (the same bytes) give the same bits as uint8.
    counts = [40, 0, 3]
    packed, scale, _, group = quantized_weights("mxfp4", 3, 256, 2880)
    offsets = offsets_of(counts)
    a = torch.randn(int(offsets[-1]), 2880, device="cuda").bfloat16()
    out = run(a, packed, offsets, None, scale.view(torch.float8_e8m0fnu), None)
    check(out, a, packed, offsets, None, scale, None, group, "e8m0fnu")
    assert torch.equal(out, run(a, packed, offsets, None, scale, None))


def test_deterministic_and_all_rows_on_one_expert():
    counts = [0, 0, 300, 0]
    packed, scale, zp, group = quantized_weights("int4-g128-asym", 4, 512, 1024)
    offsets = offsets_of(counts)
    a = torch.randn(300, 1024, device="cuda").bfloat16()
    out = run(a, packed, offsets, None, scale, zp)
    check(out, a, packed, offsets, None, scale, zp, group, "one expert")
    assert torch.equal(out, run(a, packed, offsets, None, scale, zp))


def test_cuda_graph_replay():
    # Captured once, replayed with new rows and offsets of the same shapes.
    e, n, k, rows = 4, 384, 2880, 200
    packed, scale, _, group = quantized_weights("mxfp4", e, n, k)
    a = torch.randn(rows, k, device="cuda").bfloat16()
    offsets = offsets_of([rows, 0, 0, 0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        run(a, packed, offsets, None, scale, None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fused_moe.grouped_gemm(a, packed, offsets, None, None, scale, None, None,
                                               None)
    for counts in ([50, 0, 100, 40], [0, 0, 0, 1], [200, 0, 0, 0]):
        a.copy_(torch.randn(rows, k, device="cuda"))
        offsets.copy_(offsets_of(counts))
        graph.replay()
        check(out, a, packed, offsets, None, scale, None, group, f"replay {counts}")
