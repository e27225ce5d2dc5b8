"""The PERF.md measurement of one MoE layer, in one place: used by
``python -m fused_moe bench`` and ``benchmarks/bench_moe.py``.

On a GPU each implementation is captured once in a CUDA graph and replayed
REPLAYS times, a 64 MiB buffer zeroed before each replay (outside the timed
events) so the weights come from HBM, not L2; the median of the CUDA-event
times counts. With rounds > 1 the implementations take turns, a median each
a round, and each keeps its best: the card's clock drifts by several percent
over seconds, and alternating keeps that drift from favouring one of them.
The floor is max(FLOPs / matmul rate, bytes / copy bandwidth) with both
ceilings measured in the same run. Without a GPU, CPU mode times plain
wall-clock medians (no graphs, no floor) of the same three implementations:
on the CPU, torch._grouped_mm is what transformers' ``grouped_mm`` experts
run (through torch.nn.functional.grouped_mm).

With an FP8 scheme (``quant``, one of QUANTS) the bf16 weights are quantized
by fused_moe.quant and timed beside them: fused_moe's FP8 experts, its bf16
experts on the unquantized weights ("fused_moe-bf16"), and on a GPU torch's
FP8 peer (torch._scaled_grouped_mm rowwise) and torch._grouped_mm. The floor
is then PERF.md's FP8 floor: FLOPs / fp8 matmul rate against fp8 weight
bytes + bf16 x and out / copy bandwidth. On a GPU each implementation also
reports the memory one call allocates at its peak (``extra_mib``).

With a 4-bit scheme (mxfp4, int4-g128 and the other int4 names of QUANTS)
fused_moe runs on the packed 4-bit weights beside fused_moe on the bf16
ones and on fp8-block ones ("fused_moe-fp8") made from the same bf16
weights, and torch._grouped_mm on a GPU: torch has no 4-bit grouped GEMM
("no torch peer"); vLLM's Triton W4A16 times on an H200 come from PERF.md
(``vllm_us``). Its output is checked against the per-expert loop on the
dequantized weights. The floor is PERF.md's 4-bit floor: FLOPs / bf16
matmul rate against the packed bytes + scales (+ zero points) + bf16 x and
out / copy bandwidth.

Also the one table of model shapes (MODELS, LAYER_OPTIONS) and the one
writer of benchmark records (write_json) that the benchmarks/ scripts use.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .experts import fused_experts
from .quant import (FP8_DTYPE, QuantConfig, as_quant_config, dequantize_packed4, quantize_weight,
                    scale_of)

# (E, K, H, I) of the PERF.md shapes: the one table, which benchmarks and tests import.
MODELS = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "deepseek-v3": (256, 8, 7168, 2048),
    "gpt-oss-120b": (128, 4, 2880, 2880),
}
# Each model's routing and activation as FusedMoE arguments; the models not
# listed route by softmax top-k, renormalized, into silu experts.
LAYER_OPTIONS = {
    "deepseek-v3": dict(scoring_func="sigmoid", use_grouped_topk=True, num_expert_group=8,
                        topk_group=4, routed_scaling_factor=2.5),
    "gpt-oss-120b": dict(activation="swigluoai", has_bias=True),
}
# Models whose routing also adds an e_score_correction_bias [E] (a tensor: each
# benchmark draws one).
BIASED_ROUTING = ("deepseek-v3",)
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
IMPLS = ("fused_moe", "grouped_mm", "loop")
# The FP8 schemes of --quant ("fp8-tensor" with static activation scales), and
# what is timed with one: fused_moe on fp8 weights, fused_moe on the bf16 ones,
# torch's FP8 and bf16 pipelines, the per-expert loop (bf16).
FP8_QUANTS = ("fp8-block", "fp8-channel", "fp8-tensor")
QUANT_IMPLS = ("fused_moe", "fused_moe-bf16", "scaled_grouped_mm", "grouped_mm", "loop")
QUANT_IMPLS_CPU = ("fused_moe", "fused_moe-bf16", "loop")
# The 4-bit weight-only schemes (quant.as_quant_config's names), and what is
# timed with one: fused_moe on the packed weights, on the bf16 ones, and on
# FP4_PEER_FP8 weights ("fused_moe-fp8"); torch._grouped_mm (bf16) on a GPU, the
# loop (bf16) on the CPU. torch has no 4-bit grouped GEMM: no torch peer.
QUANTS_4BIT = ("mxfp4", "int4-g128", "int4-g64", "int4-g32", "int4-g128-asym")
QUANT4_IMPLS = ("fused_moe", "fused_moe-bf16", "fused_moe-fp8", "grouped_mm", "loop")
QUANT4_IMPLS_CPU = ("fused_moe", "fused_moe-bf16", "fused_moe-fp8", "loop")
FP4_PEER_FP8 = "fp8-block"  # the scheme of fused_moe-fp8
QUANTS = ("none", *FP8_QUANTS, *QUANTS_4BIT)
ALL_IMPLS = tuple(dict.fromkeys(IMPLS + QUANT_IMPLS + QUANT4_IMPLS))
OURS = ("fused_moe", "fused_moe-bf16", "fused_moe-fp8")
NO_TORCH_PEER = "no torch peer (torch has no 4-bit grouped GEMM)"
# torch._scaled_grouped_mm's only Hopper scheme: fp8 weights with a scale per
# output channel, rows quantized per token.
ROWWISE = QuantConfig.fp8_channel()
ROWWISE_NAME = "fp8-channel"  # its name in QUANTS
# PERF.md's targets on an H200, in us, at each of TOKENS: "bf16" from its first
# table, "fp8" from its "FP8 experts" table (the goal of every FP8 scheme),
# "4bit" from its "4-bit weight-only experts" table (int4 symmetric, a scale
# per 128, 64 for gpt-oss; MXFP4 within 3% of its bytes): the goal of
# TARGET_4BIT's schemes.
TARGETS_US = {
    "bf16": {
        "mixtral-8x7b": (195, 434, 695, 696, 779, 2270, 8500),
        "qwen3-30b-a3b": (29, 138, 272, 311, 334, 383, 1047),
        "qwen3-235b-a22b": (118, 484, 1061, 1192, 1194, 1520, 4187),
        "deepseek-v3": (200, 1270, 3484, 5328, 5564, 5575, 9769),
        "gpt-oss-120b": (78, 344, 994, 1559, 1572, 1577, 2760),
    },
    "fp8": {
        "mixtral-8x7b": (103, 304, 348, 389, 391, 1309, 5238),
        "qwen3-30b-a3b": (15, 68, 150, 165, 168, 194, 561),
        "qwen3-235b-a22b": (55, 244, 535, 605, 668, 765, 2245),
        "deepseek-v3": (91, 630, 1771, 2770, 2784, 3540, 5238),
        "gpt-oss-120b": (39, 185, 562, 864, 879, 1002, 1480),
    },
    "4bit": {
        "mixtral-8x7b": (71, 175, 200, 201, 529, 2398, 9592),
        "qwen3-30b-a3b": (8, 35, 77, 85, 87, 257, 1028),
        "qwen3-235b-a22b": (30, 140, 309, 341, 346, 1028, 4111),
        "deepseek-v3": (71, 363, 1039, 1597, 1606, 2398, 9592),
        "gpt-oss-120b": (21, 98, 299, 459, 468, 677, 2710),
    },
}
TARGET_4BIT = ("mxfp4", "int4-g128")
# PERF.md's vLLM 0.33 Triton W4A16 (fused_moe_kernel_gptq_awq, int4 g128,
# default config) on an H200, in us, at each of TOKENS: the only 4-bit MoE peer
# it could measure (vLLM's Marlin MoE kernel was not measurable there).
VLLM_4BIT_NAME = "vLLM Triton W4A16"
VLLM_4BIT_US = {
    "mixtral-8x7b": (757, 1891, 1780, 1808, 4287, 14152, 52795),
    "qwen3-30b-a3b": (132, 494, 1047, 831, 866, 1962, 6219),
    "qwen3-235b-a22b": (275, 1487, 3628, 2885, 2967, 6919, 22876),
    "deepseek-v3": (474, 3772, 11852, 17996, 12284, 17950, 53877),
    "gpt-oss-120b": (537, 1322, 4008, 6101, 4117, 5843, 16907),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

CPU_SHAPES = {"cpu-small": (8, 2, 256, 512), "qwen3-30b-a3b": MODELS["qwen3-30b-a3b"]}
CPU_TOKENS = (1, 32, 512)
CPU_DTYPES = ("fp32", "bf16")

REPLAYS = 50
# CPU medians: up to CPU_REPS calls, fewer (but CPU_MIN_REPS) once CPU_BUDGET_S
# seconds are spent, so that a slow point does not hold up the run.
CPU_REPS, CPU_MIN_REPS, CPU_BUDGET_S = 20, 3, 1.0
FLUSH_BYTES = 64 << 20
# Relative Frobenius distance allowed between two implementations: in bf16
# each rounds its intermediates in its own order; in fp32 only the summation
# order differs.
CHECK_RTOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
# An FP8 implementation against the loop on the unquantized weights: e4m3's
# rounding of both GEMMs' operands alone is about 6.5e-2 in every scheme (a
# float64 emulation of each at PERF.md's inputs); twice that flags a wrong one.
CHECK_RTOL_FP8 = 1.25e-1
# A 4-bit implementation against the loop on its dequantized weights (so the
# scheme's rounding does not count): PERF.md's 4-bit error goal.
CHECK_RTOL_4BIT = 2e-2
LOOP_NOTE = ("loop: per-expert loop timed without a CUDA graph (it reads the "
             "per-expert token counts on the host), so its launch gaps count")


@dataclass
class Ceilings:
    copy_gbps: float      # device-to-device copy, read + write bytes
    matmul_tflops: float  # dense bf16 8192^3 matmul on random data
    fp8_tflops: float | None = None  # dense fp8 8192^3 torch._scaled_mm, when measured


def measure_ceilings(device: torch.device | str = "cuda", fp8: bool = False) -> Ceilings:
    """The card's copy bandwidth and dense bf16 matmul rate, measured now;
    with ``fp8`` also its fp8 matmul rate (the FP8 floor's)."""
    copy = copy_gbps(device)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_us = _median_event_us(lambda: a @ b, reps=20, warmup=3)
    return Ceilings(copy_gbps=copy, matmul_tflops=2 * 8192**3 / mm_us / 1e6,
                    fp8_tflops=fp8_matmul_tflops(device) if fp8 else None)


def fp8_matmul_tflops(device: torch.device | str = "cuda") -> float | None:
    """PERF.md's fp8 rate: an 8192^3 e4m3 torch._scaled_mm (tensor scales,
    fast accumulation, bf16 out). None, with a warning, where it does not run."""
    a = torch.randn(8192, 8192, device=device).to(FP8_DTYPE)
    b = torch.randn(8192, 8192, device=device).to(FP8_DTYPE).t()  # column-major, as it needs
    one = torch.ones((), device=device)
    mm = partial(torch._scaled_mm, a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)
    try:
        mm()
    except RuntimeError as error:
        print(f"fp8 matmul rate not measured ({_first_line(error)}): no FP8 floor", file=sys.stderr)
        return None
    return 2 * 8192**3 / _median_event_us(mm, reps=20, warmup=3) / 1e6


def describe_ceilings(ceilings: Ceilings) -> str:
    text = (f"copy {ceilings.copy_gbps:.0f} GB/s (read+write), "
            f"bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s")
    if ceilings.fp8_tflops is not None:
        text += f", fp8 matmul {ceilings.fp8_tflops:.0f} TFLOP/s"
    return text


def copy_gbps(device: torch.device | str = "cuda") -> float:
    """A 1 GiB device-to-device copy: bytes read + written per second / 1e9."""
    src = torch.ones(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_event_us(lambda: dst.copy_(src), reps=20, warmup=3) / 1e3


# --- inputs and the torch implementations --------------------------------------------


def make_inputs(E: int, K: int, H: int, I: int, M: int, device, dtype=torch.bfloat16, seed: int = 0,
                row_pad: int = 0):
    """PERF.md's inputs: x ~ N(0,1), w13 ~ N(0,1)/sqrt(H), w2 ~ N(0,1)/sqrt(I),
    top-k of softmax(N(0,1) logits), renormalized. ``row_pad`` > 0 gives the
    weights as views whose rows are that many elements longer (vLLM pads by
    128 for alignment)."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(M, H, generator=gen, device=device, dtype=dtype)
    w13 = torch.randn(E, 2 * I, H, generator=gen, device=device, dtype=dtype).div_(math.sqrt(H))
    w2 = torch.randn(E, H, I, generator=gen, device=device, dtype=dtype).div_(math.sqrt(I))
    logits = torch.randn(M, E, generator=gen, device=device)
    weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if row_pad:
        w13, w2 = (F.pad(w, (0, row_pad))[..., :-row_pad] for w in (w13, w2))
    return x, w13, w2, weights, ids.to(torch.int32)


def _sorted_slots(topk_ids: torch.Tensor):
    """(expert id of each slot, slot order grouped by expert, token of each sorted slot)."""
    flat = topk_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    return flat, order, order // topk_ids.shape[1]


def _expert_groups(topk_ids: torch.Tensor, num_experts: int):
    """(slot order grouped by expert, token of each sorted slot, int32 end of
    each expert's rows in that order: the offs of torch's grouped GEMMs)."""
    flat, order, token = _sorted_slots(topk_ids)
    # scatter_add rather than bincount: bincount's output size is data-dependent.
    counts = torch.zeros(num_experts, dtype=torch.int32, device=topk_ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, token, torch.cumsum(counts, 0, dtype=torch.int32)


def _silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _grouped_experts(x, topk_weights, topk_ids, gemm13, gemm2, num_experts: int):
    """PERF.md's torch pipeline: sort, gather, grouped GEMM, SiLU-and-mul,
    grouped GEMM, weighted scatter-add; each gemm(rows, offs). No host sync,
    so it captures into a CUDA graph."""
    order, token, offs = _expert_groups(topk_ids, num_experts)
    y = gemm2(_silu_and_mul(gemm13(x[token], offs)), offs)
    y = y.float() * topk_weights.flatten()[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).to(x.dtype)


def grouped_mm_experts(x, w13, w2, topk_weights, topk_ids):
    """The torch._grouped_mm pipeline of PERF.md."""
    return _grouped_experts(x, topk_weights, topk_ids, _grouped_mm(w13), _grouped_mm(w2),
                            w13.shape[0])


def scaled_grouped_mm_experts(x, w13, w2, topk_weights, topk_ids, *, w13_scale, w2_scale,
                              use_fast_accum: bool = False):
    """PERF.md's FP8 peer: the same pipeline on torch._scaled_grouped_mm
    rowwise. w13, w2 fp8 with per-channel scales ([E, N], as ROWWISE makes
    them); each GEMM's rows quantized per token in torch; bf16 GEMM outputs
    (the only ones it has)."""
    return _grouped_experts(x, topk_weights, topk_ids,
                            _scaled_grouped_mm(w13, w13_scale, use_fast_accum),
                            _scaled_grouped_mm(w2, w2_scale, use_fast_accum), w13.shape[0])


def _grouped_mm(w):
    return lambda rows, offs: torch._grouped_mm(rows, w.transpose(1, 2), offs=offs)


def _scaled_grouped_mm(w, w_scale, use_fast_accum: bool):
    def gemm(rows, offs):
        q, scale = quantize_weight(rows[None], ROWWISE)  # [1, R, K]: a scale per row
        return torch._scaled_grouped_mm(q[0], w.transpose(1, 2), scale[0], w_scale, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum)
    return gemm


def loop_experts(x, w13, w2, topk_weights, topk_ids):
    """One matmul pair per expert that has tokens. The per-expert counts are
    read on the host, which keeps it out of CUDA graphs."""
    flat, order, token = _sorted_slots(topk_ids)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    weights = topk_weights.flatten()[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            continue
        gate, up = (x[token[rows]] @ w13[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].T
        out.index_add_(0, token[rows], y.float() * weights[rows])
    return out.to(x.dtype)


_FUNCTIONS = {"fused_moe": fused_experts, "fused_moe-bf16": fused_experts,
              "fused_moe-fp8": fused_experts, "scaled_grouped_mm": scaled_grouped_mm_experts,
              "grouped_mm": grouped_mm_experts, "loop": loop_experts}
_GRAPHED = {"fused_moe": True, "fused_moe-bf16": True, "fused_moe-fp8": True,
            "scaled_grouped_mm": True, "grouped_mm": True, "loop": False}


# --- FP8 and 4-bit weights --------------------------------------------------------------


@dataclass
class QuantizedExperts:
    w13: torch.Tensor
    w2: torch.Tensor
    kwargs: dict  # fused_experts' keyword arguments: the scales (zero points), the scheme's options
    name: str | None = None  # the scheme as a QUANTS-style name, when known

    def bytes_per_expert(self) -> int:
        """One expert's weight bytes: w13 and w2 with their scales and zero points."""
        tensors = (self.w13, self.w2, *(self.kwargs.get(k) for k in (
            "w13_scale", "w2_scale", "w13_zp", "w2_zp")))
        return sum(t[0].numel() * t.element_size() for t in tensors
                   if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.w13.shape[0])


def is_4bit(quant: str) -> bool:
    return quant in QUANTS_4BIT


def quant_config(name: str) -> QuantConfig | None:
    """A QUANTS name's scheme: None for "none", else quant.as_quant_config's,
    with static activation scales for fp8-tensor."""
    if name == "none":
        return None
    config = as_quant_config(name)
    return replace(config, activation_scheme="static") if config.weight_scale == "tensor" else config


def quantize_experts(x, w13, w2, topk_ids, config: QuantConfig,
                     name: str | None = None) -> QuantizedExperts:
    """fp8 or packed 4-bit weights and fused_experts' keyword arguments for
    ``config``; static activation scales calibrated on these inputs."""
    (q13, s13, *z13), (q2, s2, *z2) = (quantize_weight(w, config) for w in (w13, w2))
    kwargs = dict(w13_scale=s13, w2_scale=s2, **config.kernel_kwargs())
    if z13:
        kwargs["w13_zp"], kwargs["w2_zp"] = z13[0], z2[0]
    if config.static_activations:
        kwargs["a13_scale"], kwargs["a2_scale"] = static_activation_scales(x, w13, topk_ids)
    return QuantizedExperts(q13, q2, kwargs, name)


def fit_4bit_group(name: str, H: int, I: int) -> str:
    """An int4 name whose group divides both K (H and I): the scheme's group,
    halved until it does (PERF.md takes 64 for gpt-oss's 2880); other names as
    they are."""
    config = as_quant_config(name)
    if config.weight_dtype != "int4" or config.group_size is None:
        return name
    group = config.group_size
    while group > 2 and (H % group or I % group):
        group //= 2
    return name.replace(f"-g{config.group_size}", f"-g{group}")


def quant4_config(name: str) -> QuantConfig:
    """A 4-bit name's config, for any group size an int4 name spells (fit_4bit_group's)."""
    if name in QUANTS_4BIT:
        return as_quant_config(name)
    group = int(name.removeprefix("int4-g").removesuffix("-asym"))
    return QuantConfig.int4(group, symmetric=not name.endswith("-asym"))


def dequantize_experts(q: QuantizedExperts, dtype: torch.dtype):
    """(w13, w2) of packed 4-bit experts in ``dtype``, one expert at a time."""
    out = []
    for w, s, z in ((q.w13, q.kwargs["w13_scale"], q.kwargs.get("w13_zp")),
                    (q.w2, q.kwargs["w2_scale"], q.kwargs.get("w2_zp"))):
        full = torch.empty((*w.shape[:2], 2 * w.shape[2]), dtype=dtype, device=w.device)
        for e in range(w.shape[0]):
            full[e] = dequantize_packed4(w[e:e + 1], s[e:e + 1], None if z is None else z[e:e + 1],
                                         dtype)[0]
        out.append(full)
    return tuple(out)


def static_activation_scales(x, w13, topk_ids):
    """A calibration pass on the unquantized weights: one fp32 scale [1] for
    x and one for the gated activation (the second GEMM's input), each
    max(amax, SCALE_EPS) / FP8_MAX."""
    _, token, offs = _expert_groups(topk_ids, w13.shape[0])
    act = _silu_and_mul(_grouped_mm(w13)(x[token], offs))
    return tuple(scale_of(t.abs().amax()).reshape(1) for t in (x, act))


# --- floor --------------------------------------------------------------------------


def flops(K: int, H: int, I: int, M: int, gated: bool = True) -> int:
    """Matmul FLOPs of a forward: two GEMMs per slot, the first 2I wide when gated."""
    return 2 * M * K * (3 if gated else 2) * H * I


def bytes_moved(topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor,
                weight_bytes: int | None = None, expert_bytes: int | None = None) -> int:
    """Weights of every expert some token chose, plus x and out; the weights at
    ``weight_bytes`` an element (1 for fp8; default their own; scales left out),
    or ``expert_bytes`` an expert (4-bit: QuantizedExperts.bytes_per_expert,
    packed weights with their scales)."""
    hit = torch.unique(topk_ids).numel()
    per_expert = expert_bytes or (w13[0].numel() + w2[0].numel()) * (
        weight_bytes or w13.element_size())
    return hit * per_expert + 2 * x.numel() * x.element_size()


def floor_us(work: int, moved: int, ceilings: Ceilings | None, fp8: bool = False) -> float | None:
    """max(FLOPs / matmul rate (fp8's with ``fp8``), bytes / copy bandwidth)."""
    rate = None if ceilings is None else ceilings.fp8_tflops if fp8 else ceilings.matmul_tflops
    if rate is None:
        return None
    return max(work / (rate * 1e6), moved / (ceilings.copy_gbps * 1e3))


# --- timing -------------------------------------------------------------------------


def time_graph(fn, flush: torch.Tensor, replays: int):
    """(median us of replays of fn captured in a CUDA graph, L2 flushed before
    each; a copy of fn's output when it returns one tensor)."""
    graph, out = _capture(fn)
    return _median_event_us(graph.replay, replays, flush), (
        out.clone() if isinstance(out, torch.Tensor) else None)


def _capture(fn):
    """(a CUDA graph of one call of fn, that call's output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: lazy inits, workspaces
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _median_event_us(fn, reps: int, flush: torch.Tensor | None = None, warmup: int = 0) -> float:
    """Median CUDA-event time of ``reps`` calls of fn, in us; with ``flush``,
    that buffer is zeroed before each call so fn reads from HBM, not L2."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        if flush is not None:
            flush.zero_()  # evicts the weights from L2; before the start event, so not timed
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events)


def _median_cpu_us(fn, reps: int) -> float:
    """Median wall-clock time of up to ``reps`` calls of fn, in us (see CPU_BUDGET_S)."""
    times = []
    while len(times) < reps and (len(times) < CPU_MIN_REPS or sum(times) < CPU_BUDGET_S):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _prepare(call, graphed: bool, device: torch.device):
    """(a no-argument call to time, its output): on the GPU a CUDA-graph replay
    of ``call`` where ``graphed``, else a plain call after a warm-up."""
    if device.type == "cuda" and graphed:
        graph, out = _capture(call)
        return graph.replay, out
    call()
    return call, call()


def peak_extra_mib(call) -> float:
    """The GPU memory one call of ``call`` allocates at its peak beyond what
    was allocated before it, its output included, in MiB; after a warm-up
    call, so that lazily made workspaces do not count."""
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra / 2**20


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# --- one point, many points -----------------------------------------------------------


def run_point(name: str, shape, M: int, *, impls=None, ceilings: Ceilings | None = None,
              device="cuda", replays: int = REPLAYS, rounds: int = 1,
              dtype: torch.dtype | None = None, row_pad: int = 0, quant: str = "none") -> list[dict]:
    """Times each implementation (default default_impls(quant)) at one
    (shape, M, dtype), the best of `rounds` medians taken in turns; returns
    one dict each.

    Every output is checked once against the per-expert loop (the plainest
    implementation), so each peer is checked against fused_moe through it;
    a mismatch is reported (``rel_diff``, ``ok``) and warned about, so one
    wrong point does not hide the others. An implementation that does not
    run here gets a row without times (``us`` None, ``error`` why). The
    dtype defaults to bf16 on the GPU, float32 on "cpu", where times are
    wall-clock medians (see CPU_REPS) and the floor and memory fields are
    None. ``quant`` (of QUANTS): fused_moe on fp8 or packed 4-bit weights
    made from the bf16 ones (see quantize_experts; an int4 group that does
    not divide H and I is halved until it does, fit_4bit_group, and the row's
    ``weights`` names the one used); an implementation with variants (the
    scaled_grouped_mm's use_fast_accum) keeps its fastest (``variant``). A
    4-bit fused_moe is checked against the loop on its dequantized weights
    (CHECK_RTOL_4BIT), the fp8 ones against the loop on the bf16 weights.
    """
    E, K, H, I = shape
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impls = tuple(impls or default_impls(quant, device.type == "cuda"))
    x, w13, w2, weights, ids = make_inputs(E, K, H, I, M, device, dtype, row_pad=row_pad)
    args = (x, w13, w2, weights, ids)
    point = dict(shape=name, E=E, K=K, H=H, I=I, M=M, dtype=_dtype_name(dtype), quant=quant,
                 row_pad=row_pad)
    where = f"{name} M={M} {point['dtype']}" + ("" if quant == "none" else f" {quant}")
    reference = loop_experts(*args)
    references = dict.fromkeys(impls, (reference, CHECK_RTOL[dtype]))
    quantized, errors = {}, {}
    if quant != "none" and "fused_moe" in impls:
        try:
            quantized["fused_moe"] = _quantize_for(quant, args, H, I)
        except (RuntimeError, NotImplementedError, ValueError) as error:
            errors["fused_moe"] = _first_line(error)
            print(f"n/a: fused_moe does not run at {where}: {errors['fused_moe']}", file=sys.stderr)
    if "fused_moe-fp8" in impls:
        quantized["fused_moe-fp8"] = quantize_experts(x, w13, w2, ids, quant_config(FP4_PEER_FP8),
                                                      FP4_PEER_FP8)
    if "scaled_grouped_mm" in impls:
        quantized["scaled_grouped_mm"] = _rowwise_experts(args, quantized.get("fused_moe"),
                                                          quant_config(quant))
    for impl, q in quantized.items():
        if q.w13.dtype == torch.uint8:  # 4-bit: the reference computes on its dequantized weights
            references[impl] = loop_experts(x, *dequantize_experts(q, dtype), weights, ids), \
                CHECK_RTOL_4BIT
        elif q.w13.dtype == FP8_DTYPE:
            references[impl] = reference, CHECK_RTOL_FP8
    steps, extra, failed = _prepare_all(
        {impl: _calls(impl, args, quantized) for impl in impls if impl not in errors},
        device, where)
    errors.update(failed)
    best = _time_rounds(steps, _median_of(device, replays), rounds)
    work = flops(K, H, I, M)
    ours = quantized.get("fused_moe")
    if ours is not None and ours.w13.dtype == torch.uint8:  # PERF.md's 4-bit floor
        floor = floor_us(work, bytes_moved(ids, w13, w2, x, expert_bytes=ours.bytes_per_expert()),
                         ceilings)
    elif is_4bit(quant):
        floor = None  # fused_moe's 4-bit weights not made: their bytes unknown
    else:
        floor = floor_us(work, bytes_moved(ids, w13, w2, x, 1 if quant != "none" else None),
                         ceilings, fp8=quant != "none")
    rows = []
    for impl in impls:
        q = quantized.get(impl)
        row = dict(point, impl=impl, weights=q.name if q else point["dtype"], variant=None,
                   us=None, rel_diff=None, ok=None, tflops=None, gbps=None, floor_us=floor,
                   pct_of_floor=None, extra_mib=extra.get(impl),
                   graph=device.type == "cuda" and _GRAPHED[impl], device=device.type,
                   error=errors.get(impl))
        if impl == "fused_moe" and is_4bit(quant) and q is None:
            row["weights"] = quant
        if impl not in errors:
            variant = min((v for i, v in best if i == impl), key=lambda v: best[impl, v])
            us, out = best[impl, variant], steps[impl, variant][1]
            expected, tolerance = references[impl]
            diff = _check(impl, out, expected, where, tolerance)
            moved = bytes_moved(ids, w13, w2, x, expert_bytes=q.bytes_per_expert()) \
                if q is not None and q.w13.dtype == torch.uint8 else \
                bytes_moved(ids, w13, w2, x, 1 if q is not None else None)
            row.update(variant=variant, us=us, rel_diff=diff, ok=bool(diff <= tolerance),
                       tflops=work / us / 1e6, gbps=moved / us / 1e3,
                       pct_of_floor=None if floor is None else 100 * floor / us)
        rows.append(row)
    _add_speedups(rows)
    _add_targets(rows)
    return rows


def _quantize_for(quant: str, args, H: int, I: int) -> QuantizedExperts:
    """fused_moe's weights for a QUANTS scheme: fp8 as quant_config has it;
    4-bit with fit_4bit_group's group (a note on stderr when it differs)."""
    x, w13, w2, _, ids = args
    if not is_4bit(quant):
        return quantize_experts(x, w13, w2, ids, quant_config(quant), quant)
    name = fit_4bit_group(quant, H, I)
    if name != quant:
        print(f"note: {quant}: group {name.split('-g')[1].split('-')[0]} here "
              f"({quant.split('-g')[1].split('-')[0]} does not divide H={H} and I={I}); "
              f"weights {name}", file=sys.stderr)
    return quantize_experts(x, w13, w2, ids, quant4_config(name), name)


def _rowwise_experts(args, fp8: QuantizedExperts | None, config) -> QuantizedExperts:
    """scaled_grouped_mm's weights: fused_moe's when they are ROWWISE's, else
    made by it; its keyword arguments the two scales."""
    x, w13, w2, _, ids = args
    if fp8 is None or config != ROWWISE:
        fp8 = quantize_experts(x, w13, w2, ids, ROWWISE)
    return QuantizedExperts(fp8.w13, fp8.w2, {k: fp8.kwargs[k] for k in ("w13_scale", "w2_scale")},
                            ROWWISE_NAME)


def _calls(impl: str, args, quantized: dict) -> dict:
    """{variant (None when it has one): a no-argument call} of one
    implementation; ``quantized`` {impl: QuantizedExperts} the weights of
    those that run on quantized ones."""
    fn = _FUNCTIONS[impl]
    x, _, _, weights, ids = args
    q = quantized.get(impl)
    if impl == "scaled_grouped_mm":
        return {f"use_fast_accum={fast}": partial(fn, x, q.w13, q.w2, weights, ids,
                                                  use_fast_accum=fast, **q.kwargs)
                for fast in (False, True)}
    if q is not None:
        return {None: partial(fn, x, q.w13, q.w2, weights, ids, **q.kwargs)}
    return {None: partial(fn, *args)}


def _prepare_all(calls: dict, device: torch.device, where: str):
    """({(impl, variant): (step, output)}, {impl: peak extra MiB}, {impl: why
    it does not run}) for {impl: {variant: call}}: a variant that fails is
    left out, an implementation none of whose variants runs is an error."""
    steps, extra, errors = {}, {}, {}
    for impl, variants in calls.items():
        failures = []
        for variant, call in variants.items():
            try:
                if device.type == "cuda" and impl not in extra:
                    extra[impl] = peak_extra_mib(call)
                steps[impl, variant] = _prepare(call, _GRAPHED[impl], device)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
                failures.append(_first_line(error))
        if len(failures) == len(variants):
            errors[impl] = failures[0]
            extra.pop(impl, None)
            print(f"n/a: {impl} does not run at {where}: {errors[impl]}", file=sys.stderr)
    return steps, extra, errors


def _median_of(device: torch.device, replays: int):
    """The timer of a point: CUDA-event medians of `replays` calls, L2 flushed
    before each, on the GPU; wall-clock medians on the CPU."""
    if device.type == "cuda":
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
        return lambda step: _median_event_us(step, replays, flush)
    return lambda step: _median_cpu_us(step, CPU_REPS)


def _time_rounds(steps: dict, median, rounds: int) -> dict:
    """{key: best of `rounds` medians}, every step timed once a round, in turns."""
    best = dict.fromkeys(steps, math.inf)
    for _ in range(rounds):
        for key, (step, _) in steps.items():
            best[key] = min(best[key], median(step))
    return best


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The error's first sentence, cut at ``limit`` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(impl, out, reference, where, tolerance) -> float:
    diff = _rel_diff(out, reference)
    if not diff <= tolerance:
        print(f"WRONG: {impl} differs from the per-expert loop at {where}: relative Frobenius "
              f"distance {diff:.3g} > {tolerance}", file=sys.stderr)
    return diff


def _add_speedups(rows) -> None:
    """``speedup``: grouped_mm's time over each one's. On fused_moe's row also
    ``best_peer``, the fastest implementation not ours, ``vs_best_peer``, its
    time over fused_moe's, ``vs_bf16``, fused_moe-bf16's over fused_moe's, and
    with a 4-bit scheme ``vs_fp8``, fused_moe-fp8's over fused_moe's. Rows
    without a time get None."""
    timed = [r for r in rows if r["us"] is not None]
    base = next((r["us"] for r in timed if r["impl"] == "grouped_mm"), None)
    bf16 = next((r["us"] for r in timed if r["impl"] == "fused_moe-bf16"), None)
    fp8 = next((r["us"] for r in timed if r["impl"] == "fused_moe-fp8"), None)
    fastest = min((r for r in timed if r["impl"] not in OURS), key=lambda r: r["us"], default=None)
    for r in rows:
        us = r["us"]
        mine = r["impl"] == "fused_moe" and us is not None
        r["speedup"] = None if base is None or us is None else base / us
        r["best_peer"] = fastest["impl"] if mine and fastest else None
        r["vs_best_peer"] = fastest["us"] / us if mine and fastest else None
        r["vs_bf16"] = bf16 / us if mine and bf16 else None
        if is_4bit(r.get("quant", "none")):
            r["vs_fp8"] = fp8 / us if mine and fp8 else None


def target_us(shape: str, M: int, quant: str = "none") -> float | None:
    """PERF.md's target for fused_moe at a PERF.md point (bf16, an FP8
    scheme's name, or one of TARGET_4BIT); None elsewhere."""
    if is_4bit(quant) and quant not in TARGET_4BIT:
        return None
    table = "bf16" if quant == "none" else "4bit" if is_4bit(quant) else "fp8"
    return _at_point(TARGETS_US[table], shape, M)


def vllm_4bit_us(shape: str, M: int, quant: str) -> float | None:
    """PERF.md's vLLM Triton W4A16 time on an H200 at a PERF.md point, for a
    4-bit scheme's name; None elsewhere."""
    return _at_point(VLLM_4BIT_US, shape, M) if is_4bit(quant) else None


def _at_point(table: dict, shape: str, M: int):
    times = table.get(shape)
    return times[TOKENS.index(M)] if times and M in TOKENS else None


def _add_targets(rows) -> None:
    """``target_us`` and ``meets_target`` on fused_moe's row at PERF.md's
    points (bf16 activations, on a GPU), None elsewhere; with a 4-bit scheme
    also ``vllm_us``, PERF.md's vLLM Triton W4A16 time there, and
    ``vs_vllm``, its time over fused_moe's."""
    for r in rows:
        mine = r["impl"] == "fused_moe" and r["dtype"] == "bf16" and r["device"] == "cuda"
        quant = r.get("quant", "none")
        target = target_us(r["shape"], r["M"], quant) if mine else None
        r["target_us"] = target
        r["meets_target"] = None if target is None else r["us"] is not None and r["us"] <= target
        if is_4bit(quant):
            vllm = vllm_4bit_us(r["shape"], r["M"], quant) if mine else None
            r["vllm_us"] = vllm
            r["vs_vllm"] = vllm / r["us"] if vllm and r["us"] else None


def _dtype_name(dtype: torch.dtype) -> str:
    names = [name for name, d in DTYPES.items() if d == dtype]
    return names[0] if names else str(dtype).removeprefix("torch.")


def default_impls(quant: str = "none", cuda: bool | None = None) -> tuple[str, ...]:
    """IMPLS; with an FP8 scheme QUANT_IMPLS (on a GPU, the loop only as the
    reference) or QUANT_IMPLS_CPU; with a 4-bit one QUANT4_IMPLS (the same)
    or QUANT4_IMPLS_CPU."""
    if quant == "none":
        return IMPLS
    cuda = torch.cuda.is_available() if cuda is None else cuda
    every, on_cpu = (QUANT4_IMPLS, QUANT4_IMPLS_CPU) if is_4bit(quant) else (
        QUANT_IMPLS, QUANT_IMPLS_CPU)
    return tuple(i for i in every if i != "loop") if cuda else on_cpu


def check_impls(impls, quant: str = "none") -> None:
    """ValueError for an unknown scheme or implementation, or one that needs
    another scheme (scaled_grouped_mm an FP8 one, fused_moe-fp8 a 4-bit one)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose from {','.join(QUANTS)}")
    allowed = IMPLS if quant == "none" else QUANT4_IMPLS if is_4bit(quant) else QUANT_IMPLS
    unknown = [i for i in impls if i not in allowed]
    if unknown and set(unknown) <= set(ALL_IMPLS):
        needs = [f"{i} needs {'a 4-bit' if i in QUANT4_IMPLS else 'an FP8'} scheme (--quant)"
                 for i in unknown]
        if is_4bit(quant):
            needs.append(NO_TORCH_PEER)
        raise ValueError("; ".join(needs))
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; choose from {','.join(allowed)}")


def check_device_support(impls) -> None:
    """Fails early, and clearly, when an implementation cannot run on this GPU."""
    if any(impl in OURS for impl in impls) and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fused_moe::fused_experts", "CUDA"):
        raise RuntimeError("fused_moe was built without CUDA kernels (see `python -m fused_moe "
                           "info`); rebuild it with nvcc, or leave fused_moe out of the impls")


def run(shapes: dict, tokens, *, impls=None, dtypes=None, ceilings: Ceilings | None = None,
        show_progress: bool = True, rounds: int = 1, row_pad: int = 0,
        quant: str = "none") -> list[dict]:
    """Every (shape, M, dtype) point, dtypes named as in DTYPES (default bf16
    on the GPU or with an FP8 scheme, else CPU_DTYPES), impls by default
    default_impls(quant): on the GPU if there is one, else CPU mode."""
    cuda = torch.cuda.is_available()
    impls = tuple(impls or default_impls(quant, cuda))
    check_impls(impls, quant)
    dtypes = dtypes or (("bf16",) if cuda or quant != "none" else CPU_DTYPES)
    if cuda:
        check_device_support(impls)
        ceilings = ceilings or measure_ceilings(fp8=quant != "none")
    points = [(name, shape, dtype, M) for name, shape in shapes.items() for dtype in dtypes
              for M in tokens]
    results = []
    for name, shape, dtype, M in progress(points, desc="bench", enabled=show_progress):
        results += run_point(name, shape, M, impls=impls, ceilings=ceilings,
                             device="cuda" if cuda else "cpu", rounds=rounds,
                             dtype=DTYPES[dtype], row_pad=row_pad, quant=quant)
        if cuda:
            torch.cuda.empty_cache()  # each point's weights and graph pools go before the next
    return results


def progress(items: list, desc: str, enabled: bool = True):
    """tqdm when installed, else a plain counter on stderr."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm  # an optional dependency
    except ImportError:
        for i, item in enumerate(items):
            print(f"\r{desc}: {i}/{len(items)}", end="", file=sys.stderr, flush=True)
            yield item
        print(f"\r{desc}: {len(items)}/{len(items)}", file=sys.stderr)
        return
    yield from tqdm(items, desc=desc, file=sys.stderr)


# --- presentation ---------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    """A fixed-width table, one row per (shape, M, dtype, impl); "n/a" for an
    implementation that did not run, with why below."""
    head = ("shape", "E", "K", "H", "I", "M", "dtype", "weights", "impl", "us", "TFLOP/s", "GB/s",
            "extra MiB", "floor us", "% floor", "vs grouped_mm")
    rows = [head] + [(
        r["shape"], str(r["E"]), str(r["K"]), str(r["H"]), str(r["I"]), str(r["M"]), r["dtype"],
        r["weights"], r["impl"] + ("" if r["graph"] or r["device"] != "cuda" else " *"),
        _fmt(r["us"], ".1f", missing="n/a"), _fmt(r["tflops"], ".1f"), _fmt(r["gbps"], ".0f"),
        _fmt(r["extra_mib"], ".0f"), _fmt(r["floor_us"], ".1f"), _fmt(r["pct_of_floor"], ".0f"),
        _fmt(r["speedup"], ".2f", "x"),
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    first_number = head.index("us")
    lines = ["  ".join(cell.rjust(w) if i >= first_number else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if any(r["device"] == "cuda" and not r["graph"] for r in results):
        lines.append("* " + LOOP_NOTE)
    if any(r["variant"] for r in results):
        lines.append("scaled_grouped_mm: the faster of use_fast_accum False and True (JSON: variant)")
    if any(is_4bit(r.get("quant", "none")) for r in results):
        lines.append(f"4-bit: {NO_TORCH_PEER}; fused_moe-fp8 is fused_moe on {FP4_PEER_FP8} "
                     "weights made from the same bf16 ones; the floor is PERF.md's 4-bit floor "
                     "(packed weights + scales)")
    errors = dict.fromkeys((r["impl"], r["error"]) for r in results if r["error"])
    lines += [f"n/a: {impl}: {error}" for impl, error in errors]
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """One line per point: every implementation's time and fused_moe's
    speedup over the fastest of the others."""
    lines = []
    for r in results:
        if r["best_peer"] is None:
            continue
        point = [p for p in results if _same_point(p, r)]
        times = ", ".join(f"{p['impl']} {_fmt(p['us'], '.1f', ' us', 'n/a')}" for p in point)
        scheme = "" if r.get("quant", "none") == "none" else f" {r['quant']}"
        line = (f"{r['shape']} M={r['M']} {r['dtype']}{scheme}: {times}; fused_moe "
                f"{r['vs_best_peer']:.2f}x over the best peer ({r['best_peer']})")
        if r.get("vs_bf16"):
            line += f", {r['vs_bf16']:.2f}x over fused_moe-bf16"
        if r.get("vs_fp8"):
            line += f", {r['vs_fp8']:.2f}x over fused_moe-fp8"
        if is_4bit(r.get("quant", "none")):
            line += "; " + NO_TORCH_PEER.split(" (")[0]
            if r.get("vllm_us"):
                line += (f"; PERF.md's {VLLM_4BIT_NAME} (H200) {r['vllm_us']:.0f} us, "
                         f"{r['vs_vllm']:.2f}x")
        lines.append(line)
    return "\n".join(lines)


def format_targets(results: list[dict]) -> str:
    """"targets met: N of T" for fused_moe at the points PERF.md sets a target
    for (its H200 targets, unscaled), and the points over theirs; "" when none."""
    rows = [r for r in results if r.get("target_us") is not None]
    if not rows:
        return ""
    met = sum(bool(r["meets_target"]) for r in rows)
    schemes = " and ".join(dict.fromkeys("bf16" if r.get("quant", "none") == "none" else r["quant"]
                                         for r in rows))
    lines = [f"targets met: {met} of {len(rows)} ({schemes}; PERF.md's H200 targets)"]
    lines += [f"  over: {r['shape']} M={r['M']}: {_fmt(r['us'], '.0f', ' us', 'n/a')} > "
              f"{r['target_us']:.0f} us" for r in rows if not r["meets_target"]]
    return "\n".join(lines)


def _same_point(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("shape", "E", "K", "H", "I", "M", "dtype", "quant"))


def _fmt(value, spec: str, suffix: str = "", missing: str = "-") -> str:
    return missing if value is None else format(value, spec) + suffix


# --- records --------------------------------------------------------------------------


def write_json(path: str | Path, *, device: torch.device | str | None = None, **fields) -> None:
    """Writes one benchmark record: what the run depends on besides its code
    (date, card, torch and CUDA versions, CPU threads, commit, command line),
    then ``fields`` (the results, and whatever the benchmark adds; a field of
    the same name, e.g. ``command``, replaces the default)."""
    with open(path, "w") as f:
        json.dump({**environment(device), **fields}, f, indent=1)


def environment(device: torch.device | str | None = None) -> dict:
    """The fields every record starts with; ``device`` names the card (default
    the current GPU, else the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dict(date=datetime.date.today().isoformat(), card=card_name(device),
                torch=torch.__version__, cuda=torch.version.cuda,
                cpu_threads=torch.get_num_threads(), commit=source_commit(),
                command=" ".join(sys.argv))


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str | None:
    """The commit of the source tree this package runs from, "-dirty" with
    uncommitted changes; None when it is installed rather than a checkout."""
    here = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        git("ls-files", "--error-unmatch", Path(__file__).name)  # tracked: a checkout
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
