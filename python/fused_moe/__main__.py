"""Command line: ``python -m fused_moe info`` and ``python -m fused_moe bench``."""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import sys

import torch

import fused_moe

from . import _C, bench

CUTLASS_BUILD_VERSION = "4.2.0.0"  # pyproject.toml's build requirement


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_moe")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build, CUDA kernels and GPU").set_defaults(run=info)
    add_bench_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args) or 0


# --- info -----------------------------------------------------------------------------


def info(args=None) -> None:
    for key, value in info_fields().items():
        print(f"{key:<14}{value}")


def info_fields() -> dict:
    return {
        "fused_moe": fused_moe.__version__,
        "torch": torch.__version__,
        "CUDA runtime": torch.version.cuda or "none (torch built without CUDA)",
        "CUTLASS": cutlass_version(),
        "build": build_info(),
        "CUDA kernels": cuda_kernels(build_info()),
        "GPU": gpu_description(),
    }


def cutlass_version() -> str:
    try:
        return importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return f"build-time {CUTLASS_BUILD_VERSION}"


def build_info() -> str:
    """What _C was compiled with, e.g.
    "cuda=1 archs=80-real 90a-real sm90_configs=swap_64x16x128,coop_128x256x64"."""
    library = ctypes.CDLL(_C.__file__)
    library.fused_moe_build_info.restype = ctypes.c_char_p
    return library.fused_moe_build_info().decode()


def cuda_kernels(build: str) -> str:
    """Every op has CUDA kernels in a CUDA build; which sm90 GEMMs were built."""
    fields = dict(f.split("=", 1) for f in build.split(" ") if "=" in f)
    if fields.get("cuda") != "1":
        return "none (built without nvcc or with FUSED_MOE_CUDA=0)"
    return f"every op; sm90 grouped GEMMs: {fields.get('sm90_configs') or 'none (no 9.0a arch)'}"


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "none"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB"


# --- bench ----------------------------------------------------------------------------


def add_bench_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="time fused_moe against torch._grouped_mm and a per-expert loop (PERF.md)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", choices=sorted(bench.MODELS),
                       help="a PERF.md shape (default qwen3-30b-a3b; on CPU "
                            f"{' and '.join(bench.CPU_SHAPES)})")
    which.add_argument("--shape", type=_ints(4), metavar="E,K,H,I", help="experts, top-k, hidden, intermediate")
    parser.add_argument("--tokens", type=_ints(), metavar="M,M,...",
                        help=f"token counts (default {','.join(map(str, bench.TOKENS))}; "
                             f"on CPU {','.join(map(str, bench.CPU_TOKENS))})")
    parser.add_argument("--impl", type=_names(bench.ALL_IMPLS), metavar="NAME,...",
                        help=f"implementations to time, of {','.join(bench.IMPLS)} (default all); "
                             "with --quant also fused_moe-bf16 (fused_moe on the bf16 weights), "
                             "with an FP8 scheme scaled_grouped_mm (torch._scaled_grouped_mm "
                             "rowwise, GPU only), with a 4-bit one fused_moe-fp8 (fused_moe on "
                             "fp8-block weights; torch has no 4-bit peer); by default all but the "
                             f"loop on a GPU, {','.join(bench.QUANT_IMPLS_CPU)} (4-bit: "
                             f"{','.join(bench.QUANT4_IMPLS_CPU)}) on CPU")
    parser.add_argument("--quant", choices=bench.QUANTS, default="none",
                        help="time fused_moe on weights quantized from the bf16 ones: FP8 with "
                             "128x128 block, per-channel or per-tensor scales (fp8-tensor with "
                             "static activation scales), or 4-bit weight-only (mxfp4; int4 with "
                             "a bf16 scale per 128/64/32, -asym with zero points), beside the "
                             "bf16 peers (default none)")
    parser.add_argument("--dtype", type=_names(bench.DTYPES), metavar="NAME,...",
                        help=f"dtypes, of {','.join(bench.DTYPES)} (default bf16; on CPU "
                             f"{','.join(bench.CPU_DTYPES)})")
    parser.add_argument("--rounds", type=_ints(1), default=(1,), metavar="N",
                        help="take N medians per implementation, in turns, and keep the best (default 1)")
    parser.add_argument("--json", metavar="FILE", help="write the results, card and date as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot time against tokens (needs matplotlib)")
    parser.set_defaults(run=run_bench, parser=parser)


def _ints(count: int | None = None):
    def parse(text: str) -> tuple[int, ...]:
        values = tuple(int(v) for v in text.split(","))
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated integers, got {text!r}")
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
        return values
    return parse


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = set(names) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {','.join(allowed)}")
        return names
    return parse


def run_bench(args) -> None:
    if args.plot:
        _require_matplotlib()
    cuda = torch.cuda.is_available()
    if not cuda:
        print("No GPU found: CPU mode (wall-clock medians, no CUDA graphs, no floor).")
    shapes = _shapes(args, cuda)
    tokens = args.tokens or (bench.TOKENS if cuda else bench.CPU_TOKENS)
    impls = args.impl or bench.default_impls(args.quant, cuda)
    try:
        bench.check_impls(impls, args.quant)
    except ValueError as error:
        args.parser.error(str(error))
    ceilings = None
    if cuda:
        bench.check_device_support(impls)
        ceilings = bench.measure_ceilings(fp8=args.quant != "none")
        print(f"{torch.cuda.get_device_name()}: {bench.describe_ceilings(ceilings)}")
    results = bench.run(shapes, tokens, impls=impls, dtypes=args.dtype, ceilings=ceilings,
                        rounds=args.rounds[0], quant=args.quant)
    print(bench.format_table(results))
    print(bench.format_summary(results))
    targets = bench.format_targets(results)
    if targets:
        print(targets)
    if args.json:
        bench.write_json(args.json, command=" ".join(["python -m fused_moe"] + sys.argv[1:]),
                         build=info_fields(), quant=args.quant,
                         ceilings=None if ceilings is None else vars(ceilings), results=results)
    if args.plot:
        _plot(results, args.plot)


def _shapes(args, cuda: bool) -> dict:
    if args.shape:
        return {"custom": args.shape}
    if args.model or cuda:
        name = args.model or "qwen3-30b-a3b"
        return {name: bench.MODELS[name]}
    return dict(bench.CPU_SHAPES)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")


def _plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in dict.fromkeys((r["shape"], r["dtype"], r["impl"]) for r in results):
        points = [(r["M"], r["us"]) for r in results
                  if (r["shape"], r["dtype"], r["impl"]) == line and r["us"] is not None]
        ax.plot(*zip(*points), marker="o", label=" ".join(line))
    ax.set(xscale="log", yscale="log", xlabel="tokens (M)", ylabel="time (us)",
           title="MoE experts forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
