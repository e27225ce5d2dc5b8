"""The grouped GEMM alone, every configuration against torch._grouped_mm.

For each PERF.md model shape and M tokens, rows = M * topk routed by topk of
softmax(N(0,1) logits); GEMM1 is N=2I, K=H, GEMM2 is N=H, K=I. Each config is
forced through FUSED_MOE_GEMM_CONFIG, captured in a CUDA graph and replayed
50 times, a 64 MiB buffer zeroed before each replay so weights come from HBM;
the median of CUDA-event times counts. Bytes = weights of the experts with
rows + a + out.

    python benchmarks/bench_gemm.py [--models qwen3-30b-a3b] [--ms 1,128] [--json out.json]
"""

import argparse
import os
import sys

import torch

from fused_moe import bench  # the PERF.md shapes and the graph-replay timer

# csrc/cuda/grouped_gemm/sm90_configs.h
SM90_CONFIGS = ["swap_64x16x128", "swap_128x16x128", "swap_128x32x128", "swap_128x64x64",
                "coop_128x256x64", "ping_64x256x64"]
TORCH = "torch._grouped_mm"


def with_config(config, fn):
    def run():
        os.environ["FUSED_MOE_GEMM_CONFIG"] = config
        try:
            return fn()
        finally:
            del os.environ["FUSED_MOE_GEMM_CONFIG"]
    return run


def bench_point(a, w, offsets, configs, replays, flush):
    """{name: microseconds}, and the names whose output disagrees with torch.
    torch._grouped_mm takes bf16 only: in an fp16 run it gets bf16 copies of
    the operands (the same work; its output, the reference, is within bf16
    rounding of the fp16 one)."""
    times, wrong = {}, []
    ta, tw = a.to(torch.bfloat16), w.to(torch.bfloat16)
    times[TORCH], ref = bench.time_graph(
        lambda: torch._grouped_mm(ta, tw.transpose(-2, -1), offs=offsets[1:]), flush, replays)
    ref = ref.float()
    for config in configs:
        fn = lambda: torch.ops.fused_moe.grouped_gemm(a, w, offsets, None)  # noqa: E731
        if config != "default":
            fn = with_config(config, fn)
        times[config], out = bench.time_graph(fn, flush, replays)
        if ((out.float() - ref).norm() / ref.norm()).item() > 1e-2:
            wrong.append(config)
    return times, wrong


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(bench.MODELS))
    parser.add_argument("--ms", default=",".join(map(str, bench.TOKENS)))
    parser.add_argument("--configs", default=None,
                        help="comma list; default: 'default' plus every sm90 config on an sm90 card")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--replays", type=int, default=bench.REPLAYS)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA GPU")

    sm90 = torch.cuda.get_device_capability() == (9, 0)
    configs = args.configs.split(",") if args.configs else ["default"] + (SM90_CONFIGS if sm90 else [])
    dtype = getattr(torch, args.dtype)
    flush = torch.empty(bench.FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    results = []
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  configs: {', '.join(configs)}")
    for model in args.models.split(","):
        e, topk, h, inter = bench.MODELS[model]
        for gemm, n, k in (("gemm1", 2 * inter, h), ("gemm2", h, inter)):
            w = torch.randn(e, n, k, device="cuda", dtype=dtype).div_(k**0.5)
            for m in map(int, args.ms.split(",")):
                logits = torch.randn(m, e, device="cuda")
                ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1).indices
                counts = torch.bincount(ids.flatten(), minlength=e)
                offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
                rows = m * topk
                a = torch.randn(rows, k, device="cuda").to(dtype)
                times, wrong = bench_point(a, w, offsets, configs, args.replays, flush)
                flops = 2 * rows * n * k
                nbytes = a.element_size() * ((counts > 0).sum().item() * n * k + rows * k + rows * n)
                best = min(configs, key=times.get)
                us = times[best]
                print(f"{model:16s} {gemm} M={m:<5d} {TORCH} {times[TORCH]:8.1f} us | "
                      + " ".join(f"{c} {times[c]:.1f}" for c in configs)
                      + f" | best {best} {us:.1f} us {flops / us / 1e6:.0f} TFLOP/s"
                      + f" {nbytes / us / 1e3:.0f} GB/s"
                      + f" {times[TORCH] / us:.2f}x" + (f"  WRONG: {', '.join(wrong)}" if wrong else ""))
                sys.stdout.flush()
                results.append(dict(model=model, gemm=gemm, E=e, N=n, K=k, M=m, rows=rows, flops=flops,
                                    bytes=nbytes, us=times, best=best, wrong=wrong))
            del w
            torch.cuda.empty_cache()
    if args.json:
        bench.write_json(args.json, dtype=args.dtype, results=results)


if __name__ == "__main__":
    main()
