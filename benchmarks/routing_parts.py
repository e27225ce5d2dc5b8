"""Where routing's time goes: torch.ops.fused_moe.topk on fp32 logits
[tokens, experts] with DeepSeek-V3's routing (sigmoid, grouped 8/4,
correction bias, scale 2.5) and with its parts switched off one by one
(groups, bias, then fewer choices), plus softmax. CUDA graph, L2 flushed
(fused_moe.bench.time_graph), best of three medians of 50 replays. The steps
between rows price each part: e.g. k=1 -> k=8 is seven argmax rounds.

    python benchmarks/routing_parts.py [--tokens 32768] [--experts 256] [--json PATH]
"""

import argparse

import torch

import fused_moe  # noqa: F401  (registers torch.ops.fused_moe)
from fused_moe import bench

# (name, k, scoring, bias, groups, topk_group)
CASES = [
    ("sigmoid k=8, groups 8/4, bias (DeepSeek-V3)", 8, "sigmoid", True, 8, 4),
    ("sigmoid k=8, bias", 8, "sigmoid", True, 0, 0),
    ("sigmoid k=8", 8, "sigmoid", False, 0, 0),
    ("sigmoid k=4", 4, "sigmoid", False, 0, 0),
    ("sigmoid k=1", 1, "sigmoid", False, 0, 0),
    ("softmax k=8", 8, "softmax", False, 0, 0),
    ("softmax k=1", 1, "softmax", False, 0, 0),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--json", metavar="PATH", help="write every number, the card and the date")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("routing_parts.py needs a CUDA GPU")

    ops = torch.ops.fused_moe
    flush = torch.empty(bench.FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    logits = torch.randn(args.tokens, args.experts, device="cuda")
    bias = 0.1 * torch.randn(args.experts, device="cuda")
    best = {}
    for _ in range(3):  # the cases in turn, three times: drift hits them all alike
        for name, k, scoring, with_bias, groups, topk_group in CASES:
            def run():
                return ops.topk(logits, k, True, scoring, bias if with_bias else None, groups, topk_group, 2.5)
            us = bench.time_graph(run, flush, 50)[0]
            best[name] = min(best.get(name, us), us)

    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens x {args.experts} experts, "
          "fp32 logits")
    for name, us in best.items():
        print(f"{name:45s} {us:7.1f} us")
    if args.json:
        bench.write_json(args.json, tokens=args.tokens, experts=args.experts, us=best)


if __name__ == "__main__":
    main()
