"""fused_moe.grouped_gemm on the GPU against a float64 per-expert reference:
every configuration forced through FUSED_MOE_GEMM_CONFIG, skewed routings
(empty experts, all rows on one expert, rows past offsets[E]), odd shapes,
bias, unaligned pointers and CUDA-graph replay."""

import functools

import pytest
import torch

import fused_moe  # noqa: F401  (registers torch.ops.fused_moe)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# As listed in csrc/cuda/grouped_gemm/sm90_configs.h; built for sm_90a, so
# they run only on compute capability 9.0 (elsewhere the names are refused).
SM90_CONFIGS = ["swap_64x16x128", "swap_128x16x128", "swap_128x32x128", "swap_128x64x64",
                "coop_128x256x64", "ping_64x256x64"]
ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
CONFIGS = ["default", "fallback"] + (SM90_CONFIGS if ON_SM90 else [])
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
# (N, K); the last two are not multiples of 8, so every config runs the fallback.
SHAPES = [(256, 128), (1536, 2048), (2048, 768), (2880, 2880), (700, 4100), (5, 3)]
ROUTINGS = ["one_row", "skewed", "one_expert", "skewed_tail"]


def use_config(monkeypatch, config):
    if config == "default":
        monkeypatch.delenv("FUSED_MOE_GEMM_CONFIG", raising=False)
    else:
        monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", config)


@functools.lru_cache(maxsize=1)  # the params below vary config fastest: reuse w
def weights(num_experts, n, k, dtype):
    gen = torch.Generator("cuda").manual_seed(n * 7919 + k * 31 + num_experts)
    return (torch.randn(num_experts, n, k, device="cuda", generator=gen) / k**0.5).to(dtype)


def offsets_of(counts):
    """Expert offsets [E+1] int32 on the GPU from rows per expert."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).cuda()


def routing(kind, num_experts, gen, rows=None):
    """(rows, offsets [E+1] int32): one row; a skewed split (expert shares ~ U^4,
    a third of the experts empty); every row on one expert; skewed with rows
    left past offsets[E]. rows: drawn from [2, 4096] unless given."""
    if rows is None:
        rows = 1 if kind == "one_row" else int(torch.randint(2, 4097, (1,), generator=gen))
    tail = int(torch.randint(1, rows // 4 + 2, (1,), generator=gen)) if kind == "skewed_tail" else 0
    share = torch.rand(num_experts, generator=gen) ** 4
    share[torch.rand(num_experts, generator=gen) < 1 / 3] = 0
    if kind in ("one_row", "one_expert") or share.sum() == 0:
        share = torch.zeros(num_experts)
        share[torch.randint(num_experts, (1,), generator=gen)] = 1
    ids = torch.multinomial(share, rows - tail, replacement=True, generator=gen) if rows > tail else []
    counts = torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=num_experts)
    return rows, offsets_of(counts)


def reference(a, w, offsets, bias):
    off = offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64, device=a.device)
    for e in range(w.shape[0]):
        if off[e + 1] > off[e]:
            y = a[off[e]:off[e + 1]].double() @ w[e].double().T
            out[off[e]:off[e + 1]] = y if bias is None else y + bias[e].double()
    return out


def run(a, w, offsets, bias):
    # Leave a NaN-filled block of out's size in the caching allocator: rows the
    # kernel fails to write then show up as NaN instead of lucky zeros.
    torch.full((a.shape[0], w.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
    return torch.ops.fused_moe.grouped_gemm(a, w, offsets, bias)


def check(out, a, w, offsets, bias, what):
    end = int(offsets[-1])
    assert out.shape == (a.shape[0], w.shape[1]) and out.dtype == a.dtype, what
    assert (out[end:] == 0).all(), f"{what}: rows past offsets[E]={end} are not zero"
    if end > 0:
        ref = reference(a, w, offsets, bias)[:end]
        got = out[:end].double()
        assert not got.isnan().any(), f"{what}: NaN (rows left unwritten?)"
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= TOL[a.dtype], f"{what}: relative error {err:.2e} > {TOL[a.dtype]:.0e}"


CASES = [
    pytest.param(dtype, n, k, e, bias, config,
                 id=f"{str(dtype)[6:]}-{n}x{k}-E{e}-{'bias' if bias else 'nobias'}-{config}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for n, k in SHAPES
    for e in (1, 8, 128)
    for bias in (False, True)
    for config in (CONFIGS if dtype != torch.float32 else ["default"])  # fp32 always falls back
]


@pytest.mark.parametrize("dtype,n,k,num_experts,bias,config", CASES)
def test_matches_reference(dtype, n, k, num_experts, bias, config, monkeypatch):
    use_config(monkeypatch, config)
    w = weights(num_experts, n, k, dtype)
    b = torch.randn(num_experts, n, device="cuda").to(dtype) if bias else None
    gen = torch.Generator().manual_seed(torch.initial_seed())
    for kind in ROUTINGS:
        rows, offsets = routing(kind, num_experts, gen)
        a = torch.randn(rows, k, device="cuda").to(dtype)
        check(run(a, w, offsets, b), a, w, offsets, b, f"{config}, {kind}, rows={rows}")


@pytest.mark.parametrize("config", CONFIGS)
def test_unaligned_pointers(config, monkeypatch):
    # Contiguous but 2 bytes off 16-byte alignment: TMA cannot take these, so
    # every config must fall back rather than fault.
    use_config(monkeypatch, config)
    e, n, k, rows = 8, 256, 128, 100
    a = torch.randn(rows * k + 1, device="cuda").bfloat16()[1:].view(rows, k)
    w = (torch.randn(e * n * k + 1, device="cuda") / k**0.5).bfloat16()[1:].view(e, n, k)
    b = torch.randn(e * n + 1, device="cuda").bfloat16()[1:].view(e, n)
    _, offsets = routing("skewed_tail", e, torch.Generator().manual_seed(0), rows)
    check(run(a, w, offsets, b), a, w, offsets, b, config)


@pytest.mark.parametrize("config", CONFIGS)
def test_tile_boundaries(config, monkeypatch):
    # Expert sizes on either side of 64- and 128-row tiles (each expert's last
    # tile is partial by 0 to tile - 1 rows), and rows past offsets[E].
    use_config(monkeypatch, config)
    counts = [0, 1, 63, 64, 127, 128, 129, 191, 255, 256, 257, 300]
    e, n, k = len(counts), 512, 256
    offsets = offsets_of(counts)
    rows = int(offsets[-1]) + 5
    w = weights(e, n, k, torch.bfloat16)
    b = torch.randn(e, n, device="cuda").bfloat16()
    a = torch.randn(rows, k, device="cuda").bfloat16()
    check(run(a, w, offsets, b), a, w, offsets, b, config)


@pytest.mark.parametrize("config", CONFIGS)
def test_one_k_block_many_tiles(config, monkeypatch):
    # K = 64: one k-block a tile, so the producer runs as many tiles ahead of
    # the MMAs as the pipeline has stages; 96 experts, most with a partial
    # last row tile.
    use_config(monkeypatch, config)
    gen = torch.Generator().manual_seed(64)
    counts = torch.randint(1, 400, (96,), generator=gen)
    e, n, k = len(counts), 512, 64
    offsets = offsets_of(counts)
    w = weights(e, n, k, torch.bfloat16)
    a = torch.randn(int(offsets[-1]), k, device="cuda").bfloat16()
    check(run(a, w, offsets, None), a, w, offsets, None, config)


@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_graph_replay(config, monkeypatch):
    # Captured once, replayed with new rows and a new routing of the same shapes:
    # problem sizes and pointers must come from the device, with no host sync.
    use_config(monkeypatch, config)
    e, n, k, rows = 8, 512, 256, 600
    a = torch.randn(rows, k, device="cuda").bfloat16()
    w = weights(e, n, k, torch.bfloat16)
    b = torch.randn(e, n, device="cuda").bfloat16()
    offsets = torch.zeros(e + 1, dtype=torch.int32, device="cuda")
    offsets[1:] = rows
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph advises
        torch.ops.fused_moe.grouped_gemm(a, w, offsets, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fused_moe.grouped_gemm(a, w, offsets, b)
    gen = torch.Generator().manual_seed(1)
    for step, kind in enumerate(["skewed", "one_expert", "skewed_tail", "skewed"]):
        a.copy_(torch.randn(rows, k, device="cuda"))
        offsets.copy_(routing(kind, e, gen, rows)[1])
        graph.replay()
        check(out, a, w, offsets, b, f"{config}, replay {step}")


def test_unknown_config_name(monkeypatch):
    monkeypatch.setenv("FUSED_MOE_GEMM_CONFIG", "no_such_config")
    a = torch.randn(4, 16, device="cuda").bfloat16()
    w = torch.randn(2, 16, 16, device="cuda").bfloat16()
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="FUSED_MOE_GEMM_CONFIG=no_such_config"):
        torch.ops.fused_moe.grouped_gemm(a, w, offsets, None)
