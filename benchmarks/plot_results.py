"""Draws a bench_moe.py JSON as one panel per model: time vs tokens for each
implementation, with the measured floor.

    python benchmarks/plot_results.py benchmarks/results/bench_moe_h200_2026-11-29.json out.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    results = data["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in results if r["shape"] == shape]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["M"], r["us"]) for r in rows if r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        floor = sorted({(r["M"], r["floor_us"]) for r in rows})
        ax.plot(*zip(*floor), linestyle="--", color="gray", label="floor")
        ax.set(xscale="log", yscale="log", xlabel="tokens (M)", title=shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time (us)")
    axes[0][0].legend()
    fig.suptitle(f"fused_experts, bf16, CUDA graph, L2 flushed: {data['card']}, {data['date']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a JSON record of benchmarks/bench_moe.py")
    parser.add_argument("dst", help="the PNG to write")
    args = parser.parse_args()
    main(args.src, args.dst)
