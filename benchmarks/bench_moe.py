"""PERF.md's table: every MODELS shape x M, fused_moe beside torch._grouped_mm
and a per-expert loop, measured by fused_moe.bench.

    python benchmarks/bench_moe.py [--models qwen3-30b-a3b,deepseek-v3] [--ms 1,8] [--rounds 3] [--json PATH]
"""

import argparse
import sys

import torch

from fused_moe import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(bench.MODELS),
                        help=f"comma-separated subset of {','.join(bench.MODELS)}")
    parser.add_argument("--impls", default=",".join(bench.IMPLS),
                        help=f"comma-separated subset of {','.join(bench.IMPLS)}")
    parser.add_argument("--ms", default=",".join(map(str, bench.TOKENS)),
                        help="comma-separated token counts M")
    parser.add_argument("--rounds", type=int, default=1,
                        help="medians per implementation, taken in turns; the best counts (default 1)")
    parser.add_argument("--row-pad", type=int, default=0,
                        help="weights as views with rows this many elements longer (vLLM pads by 128)")
    parser.add_argument("--json", metavar="PATH", help="write the results, card and date as JSON")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(bench.MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (python -m fused_moe bench has a CPU mode)")
    impls = args.impls.split(",")
    bench.check_device_support(impls)
    ceilings = bench.measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gbps:.0f} GB/s (read+write), "
          f"bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s")
    shapes = {name: bench.MODELS[name] for name in args.models.split(",")}
    ms = [int(m) for m in args.ms.split(",")]
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    results = bench.run(shapes, ms, impls=impls, ceilings=ceilings, rounds=args.rounds,
                        row_pad=args.row_pad)
    print(bench.format_table(results))
    targets = bench.format_targets(results)
    if targets:
        print(targets)
    if args.json:
        bench.write_json(args.json, ceilings=vars(ceilings), results=results)


if __name__ == "__main__":
    main()
