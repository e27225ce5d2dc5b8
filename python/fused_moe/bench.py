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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .experts import fused_experts

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
# PERF.md's targets on an H200, in us, at each of TOKENS: "bf16" from its first
# table, "fp8" from its "FP8 experts" table (the goal of every FP8 scheme).
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
LOOP_NOTE = ("loop: per-expert loop timed without a CUDA graph (it reads the "
             "per-expert token counts on the host), so its launch gaps count")


@dataclass
class Ceilings:
    copy_gbps: float      # device-to-device copy, read + write bytes
    matmul_tflops: float  # dense bf16 8192^3 matmul on random data


def measure_ceilings(device: torch.device | str = "cuda") -> Ceilings:
    """The card's copy bandwidth and dense bf16 matmul rate, measured now."""
    copy = copy_gbps(device)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_us = _median_event_us(lambda: a @ b, reps=20, warmup=3)
    return Ceilings(copy_gbps=copy, matmul_tflops=2 * 8192**3 / mm_us / 1e6)


def copy_gbps(device: torch.device | str = "cuda") -> float:
    """A 1 GiB device-to-device copy: bytes read + written per second / 1e9."""
    src = torch.ones(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_event_us(lambda: dst.copy_(src), reps=20, warmup=3) / 1e3


# --- inputs and the two torch implementations --------------------------------------


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


def grouped_mm_experts(x, w13, w2, topk_weights, topk_ids):
    """The torch._grouped_mm pipeline of PERF.md: sort, gather, grouped GEMM,
    SiLU-and-mul, grouped GEMM, weighted scatter-add. No host sync, so it
    captures into a CUDA graph."""
    flat, order, token = _sorted_slots(topk_ids)
    # scatter_add rather than bincount: bincount's output size is data-dependent.
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = y.float() * topk_weights.flatten()[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).to(x.dtype)


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


_FUNCTIONS = {"fused_moe": fused_experts, "grouped_mm": grouped_mm_experts, "loop": loop_experts}
_GRAPHED = {"fused_moe": True, "grouped_mm": True, "loop": False}


# --- floor --------------------------------------------------------------------------


def flops(K: int, H: int, I: int, M: int, gated: bool = True) -> int:
    """Matmul FLOPs of a forward: two GEMMs per slot, the first 2I wide when gated."""
    return 2 * M * K * (3 if gated else 2) * H * I


def bytes_moved(topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> int:
    """Weights of every expert some token chose, plus x and out."""
    hit = torch.unique(topk_ids).numel()
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    return hit * per_expert + 2 * x.numel() * x.element_size()


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


def _prepare(impl: str, args, device: torch.device):
    """(a no-argument call to time, its output): on the GPU a CUDA-graph replay
    where the implementation allows one, else a plain call after a warm-up."""
    call = lambda: _FUNCTIONS[impl](*args)  # noqa: E731
    if device.type == "cuda" and _GRAPHED[impl]:
        graph, out = _capture(call)
        return graph.replay, out
    call()
    return call, call()


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# --- one point, many points -----------------------------------------------------------


def run_point(name: str, shape, M: int, *, impls=IMPLS, ceilings: Ceilings | None = None,
              device="cuda", replays: int = REPLAYS, rounds: int = 1,
              dtype: torch.dtype | None = None, row_pad: int = 0) -> list[dict]:
    """Times each implementation at one (shape, M, dtype), the best of `rounds`
    medians taken in turns; returns one dict each.

    Every output is checked once against the per-expert loop (the plainest
    implementation), so each peer is checked against fused_moe through it;
    a mismatch is reported (``rel_diff``, ``ok``) and warned about, so one
    wrong point does not hide the others. The dtype defaults to bf16 on the
    GPU, float32 on "cpu", where times are wall-clock medians (see CPU_REPS)
    and the floor fields are None.
    """
    E, K, H, I = shape
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    x, w13, w2, weights, ids = make_inputs(E, K, H, I, M, device, dtype, row_pad=row_pad)
    args = (x, w13, w2, weights, ids)
    reference = loop_experts(*args)
    work, moved = flops(K, H, I, M), bytes_moved(ids, w13, w2, x)
    floor = None
    if ceilings is not None:
        floor = max(work / (ceilings.matmul_tflops * 1e6), moved / (ceilings.copy_gbps * 1e3))
    if device.type == "cuda":
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
        median = lambda step: _median_event_us(step, replays, flush)  # noqa: E731
    else:
        median = lambda step: _median_cpu_us(step, CPU_REPS)  # noqa: E731
    prepared = {impl: _prepare(impl, args, device) for impl in impls}
    best = {impl: math.inf for impl in impls}
    for _ in range(rounds):
        for impl, (step, _) in prepared.items():
            best[impl] = min(best[impl], median(step))
    point = dict(shape=name, E=E, K=K, H=H, I=I, M=M, dtype=_dtype_name(dtype), row_pad=row_pad)
    rows = []
    for impl in impls:
        us, out = best[impl], prepared[impl][1]
        diff = _check(impl, out, reference, f"{name} M={M} {point['dtype']}")
        rows.append(dict(point, impl=impl, us=us, rel_diff=diff,
                         ok=bool(diff <= CHECK_RTOL[dtype]),
                         tflops=work / us / 1e6, gbps=moved / us / 1e3, floor_us=floor,
                         pct_of_floor=None if floor is None else 100 * floor / us,
                         graph=device.type == "cuda" and _GRAPHED[impl], device=device.type))
    _add_speedups(rows)
    _add_targets(rows)
    return rows


def _check(impl, out, reference, where) -> float:
    diff = _rel_diff(out, reference)
    tolerance = CHECK_RTOL[reference.dtype]
    if not diff <= tolerance:
        print(f"WRONG: {impl} differs from the per-expert loop at {where}: relative Frobenius "
              f"distance {diff:.3g} > {tolerance}", file=sys.stderr)
    return diff


def _add_speedups(rows) -> None:
    """``speedup``: grouped_mm's time over each one's. On fused_moe's row also
    ``best_peer``, the fastest other implementation, and ``vs_best_peer``, its
    time over fused_moe's."""
    base = next((r["us"] for r in rows if r["impl"] == "grouped_mm"), None)
    peers = [r for r in rows if r["impl"] != "fused_moe"]
    fastest = min(peers, key=lambda r: r["us"], default=None)
    for r in rows:
        r["speedup"] = None if base is None else base / r["us"]
        mine = r["impl"] == "fused_moe" and fastest is not None
        r["best_peer"] = fastest["impl"] if mine else None
        r["vs_best_peer"] = fastest["us"] / r["us"] if mine else None


def target_us(shape: str, M: int, quant: str = "none") -> float | None:
    """PERF.md's target for fused_moe at a PERF.md point (bf16, or an FP8
    scheme's name); None elsewhere."""
    times = TARGETS_US["bf16" if quant == "none" else "fp8"].get(shape)
    return times[TOKENS.index(M)] if times and M in TOKENS else None


def _add_targets(rows) -> None:
    """``target_us`` and ``meets_target`` on fused_moe's row at PERF.md's
    points (bf16 activations, on a GPU), None elsewhere."""
    for r in rows:
        mine = r["impl"] == "fused_moe" and r["dtype"] == "bf16" and r["device"] == "cuda"
        target = target_us(r["shape"], r["M"], r.get("quant", "none")) if mine else None
        r["target_us"] = target
        r["meets_target"] = None if target is None else r["us"] is not None and r["us"] <= target


def _dtype_name(dtype: torch.dtype) -> str:
    names = [name for name, d in DTYPES.items() if d == dtype]
    return names[0] if names else str(dtype).removeprefix("torch.")


def check_device_support(impls) -> None:
    """Fails early, and clearly, when an implementation cannot run on this GPU."""
    if "fused_moe" in impls and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fused_moe::fused_experts", "CUDA"):
        raise RuntimeError("fused_moe was built without CUDA kernels (see `python -m fused_moe "
                           "info`); rebuild it with nvcc, or leave fused_moe out of the impls")


def run(shapes: dict, tokens, *, impls=IMPLS, dtypes=None, ceilings: Ceilings | None = None,
        show_progress: bool = True, rounds: int = 1, row_pad: int = 0) -> list[dict]:
    """Every (shape, M, dtype) point, dtypes named as in DTYPES (default bf16
    on the GPU, CPU_DTYPES on the CPU): on the GPU if there is one, else CPU mode."""
    cuda = torch.cuda.is_available()
    impls = tuple(impls or IMPLS)
    dtypes = dtypes or (("bf16",) if cuda else CPU_DTYPES)
    if cuda:
        check_device_support(impls)
        ceilings = ceilings or measure_ceilings()
    points = [(name, shape, dtype, M) for name, shape in shapes.items() for dtype in dtypes
              for M in tokens]
    results = []
    for name, shape, dtype, M in progress(points, desc="bench", enabled=show_progress):
        results += run_point(name, shape, M, impls=impls, ceilings=ceilings,
                             device="cuda" if cuda else "cpu", rounds=rounds,
                             dtype=DTYPES[dtype], row_pad=row_pad)
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
    """A fixed-width table, one row per (shape, M, dtype, impl)."""
    head = ("shape", "E", "K", "H", "I", "M", "dtype", "impl", "us", "TFLOP/s", "GB/s",
            "floor us", "% floor", "vs grouped_mm")
    rows = [head] + [(
        r["shape"], str(r["E"]), str(r["K"]), str(r["H"]), str(r["I"]), str(r["M"]), r["dtype"],
        r["impl"] + ("" if r["graph"] or r["device"] != "cuda" else " *"),
        f"{r['us']:.1f}", f"{r['tflops']:.1f}", f"{r['gbps']:.0f}", _fmt(r["floor_us"], ".1f"),
        _fmt(r["pct_of_floor"], ".0f"), _fmt(r["speedup"], ".2f", "x"),
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i >= 8 else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if any(r["device"] == "cuda" and not r["graph"] for r in results):
        lines.append("* " + LOOP_NOTE)
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """One line per point: every implementation's time and fused_moe's
    speedup over the fastest of the others."""
    lines = []
    for r in results:
        if r["best_peer"] is None:
            continue
        point = [p for p in results if _same_point(p, r)]
        times = ", ".join(f"{p['impl']} {p['us']:.1f} us" for p in point)
        lines.append(f"{r['shape']} M={r['M']} {r['dtype']}: {times}; fused_moe "
                     f"{r['vs_best_peer']:.2f}x over the best peer ({r['best_peer']})")
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
    return all(a[k] == b[k] for k in ("shape", "E", "K", "H", "I", "M", "dtype"))


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
