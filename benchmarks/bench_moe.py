"""PERF.md's table: every MODELS shape x M, fused_moe beside torch._grouped_mm
and a per-expert loop, measured by fused_moe.bench; with --quant, PERF.md's
FP8 table: fused_moe on FP8 weights beside fused_moe on the bf16 ones,
torch._scaled_grouped_mm rowwise and torch._grouped_mm, against the FP8
floor and targets; with a 4-bit --quant (mxfp4, int4-g128, ...), PERF.md's
4-bit table: fused_moe on the packed weights beside fused_moe on the bf16 and
on fp8-block ones ("fused_moe-fp8") and torch._grouped_mm (torch has no
4-bit peer), against the 4-bit floor and targets, with PERF.md's vLLM
Triton W4A16 times.

    python benchmarks/bench_moe.py [--models qwen3-30b-a3b,deepseek-v3] [--ms 1,8] [--rounds 3]
        [--quant fp8-block|mxfp4|int4-g128] [--json PATH]
"""

import argparse
import sys

import torch

from fused_moe import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(bench.MODELS),
                        help=f"comma-separated subset of {','.join(bench.MODELS)}")
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(bench.IMPLS)} "
                                         f"(default all), with an FP8 --quant of "
                                         f"{','.join(bench.QUANT_IMPLS)}, with a 4-bit one of "
                                         f"{','.join(bench.QUANT4_IMPLS)} (default all but the loop)")
    parser.add_argument("--quant", choices=bench.QUANTS, default="none",
                        help="FP8 or 4-bit weights made from the bf16 ones (fp8-tensor: static "
                             "activation scales; int4: a bf16 scale per group, -asym with zero "
                             "points); default none")
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
    impls = args.impls.split(",") if args.impls else bench.default_impls(args.quant, cuda=True)
    try:
        bench.check_impls(impls, args.quant)
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (python -m fused_moe bench has a CPU mode)")
    bench.check_device_support(impls)
    ceilings = bench.measure_ceilings(fp8=args.quant != "none")
    print(f"{torch.cuda.get_device_name()}: {bench.describe_ceilings(ceilings)}")
    shapes = {name: bench.MODELS[name] for name in args.models.split(",")}
    ms = [int(m) for m in args.ms.split(",")]
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    results = bench.run(shapes, ms, impls=impls, ceilings=ceilings, rounds=args.rounds,
                        row_pad=args.row_pad, quant=args.quant)
    print(bench.format_table(results))
    print(bench.format_summary(results))
    targets = bench.format_targets(results)
    if targets:
        print(targets)
    if args.json:
        bench.write_json(args.json, quant=args.quant, ceilings=vars(ceilings), results=results)


if __name__ == "__main__":
    main()
