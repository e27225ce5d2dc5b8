"""Bandwidth of the memory-bound ops (routing, permute, activation, unpermute)
on PERF.md's shapes, beside a device-to-device copy measured in the same run.

Each op is captured once into a CUDA graph and replayed; before every replay a
64 MiB buffer is zeroed, outside the timed region, so the op reads from HBM,
not L2. The median of the CUDA-event times counts. GB/s = the bytes the op
must read and write (inputs once, outputs once; no scratch) / time.

    python benchmarks/bench_ops.py [--shapes deepseek-v3,...] [--tokens 1,64,4096,32768]
                                   [--iters 50] [--json PATH]
"""

import argparse
import sys

import torch

from fused_moe import bench  # the model shapes, the graph-replay timer, the copy ceiling

ops = torch.ops.fused_moe

TOKENS = [1, 64, 4096, 32768]
BF16 = 2  # activations in bf16, logits fp32


def cases(name, m):
    """(op name, callable, bytes moved) for model ``name`` at m tokens, with
    the model's routing and activation."""
    num_experts, k, hidden, inter = bench.MODELS[name]
    options = bench.LAYER_OPTIONS.get(name, {})
    act = options.get("activation", "silu")
    dev = "cuda"
    logits = torch.randn(m, num_experts, device=dev)
    bias = 0.1 * torch.randn(num_experts, device=dev) if name in bench.BIASED_ROUTING else None
    route_args = (k, True, options.get("scoring_func", "softmax"), bias,
                  options.get("num_expert_group", 0), options.get("topk_group", 0),
                  options.get("routed_scaling_factor", 1.0))
    weights, ids = ops.topk(logits, *route_args)
    x = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
    _, _, inv = ops.permute(x, ids, num_experts, None, None)
    h = torch.randn(m * k, 2 * inter, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m * k, hidden, device=dev, dtype=torch.bfloat16)
    slots = m * k
    return [
        ("routing", lambda: ops.topk(logits, *route_args),
         4 * m * num_experts + 8 * slots + (4 * num_experts if bias is not None else 0)),
        ("permute", lambda: ops.permute(x, ids, num_experts, None, None),
         BF16 * (m + slots) * hidden + 8 * slots + 4 * (num_experts + 1)),
        ("activation", lambda: ops.activation(h, act, True), BF16 * slots * 3 * inter),
        ("unpermute", lambda: ops.unpermute(y, inv, weights),
         BF16 * (slots + m) * hidden + 8 * slots),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(bench.MODELS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", metavar="PATH", help="write every number, the card and the date")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ops.py needs a CUDA GPU")
    unknown = set(args.shapes.split(",")) - set(bench.MODELS)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}")

    copy = bench.copy_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s (read + write)")
    print(f"{'shape':<16} {'M':>6} {'op':<11} {'us':>9} {'GB/s':>7} {'of copy':>8}")
    flush = torch.empty(bench.FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    results = []
    for name in args.shapes.split(","):
        for m in map(int, args.tokens.split(",")):
            for op, fn, nbytes in cases(name, m):
                us, _ = bench.time_graph(fn, flush, args.iters)
                gbps = nbytes / us / 1e3
                results.append({"shape": name, "tokens": m, "op": op, "us": us, "bytes": nbytes,
                                "gbps": gbps, "copy_fraction": gbps / copy})
                print(f"{name:<16} {m:>6} {op:<11} {us:>9.1f} {gbps:>7.0f} {gbps / copy:>8.0%}")
            torch.cuda.empty_cache()
    if args.json:
        bench.write_json(args.json, copy_gbps=copy, results=results)


if __name__ == "__main__":
    main()
