"""Decode throughput of model.generate() with each experts implementation, on
a randomly initialised Qwen3-30B-A3B-shaped model cut to 4 layers (bf16, CUDA).

    python benchmarks/bench_generate.py [--json PATH]

Batch 1 and 32, 128 new tokens, greedy, min_new_tokens = max_new_tokens so
every implementation generates the same number of tokens.
"""

import argparse
import sys
import time

import torch
import transformers

import fused_moe.integrations.transformers  # noqa: F401  (registers "fused_moe")
from fused_moe import bench

IMPLEMENTATIONS = ("eager", "grouped_mm", "fused_moe")
BATCHES = (1, 32)
PROMPT_TOKENS = 32
NEW_TOKENS = 128


def qwen3_30b_a3b_config(layers: int = 4) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096)


def tokens_per_second(model, batch: int) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), device="cuda")
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                   pad_token_id=0)
    model.generate(prompt, **{**options, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, **options)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS
    return batch * NEW_TOKENS / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results, card and date as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU")
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise the ~3B random weights on the GPU, not the CPU
        model = transformers.AutoModelForCausalLM.from_config(
            qwen3_30b_a3b_config(), experts_implementation="eager", dtype=torch.bfloat16).eval()
    results = []
    print(f"{'implementation':<12}{'batch':>6}{'tokens/s':>12}")
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        for batch in BATCHES:
            rate = tokens_per_second(model, batch)
            results.append(dict(impl=impl, batch=batch, new_tokens=NEW_TOKENS, tokens_per_s=rate))
            print(f"{impl:<12}{batch:>6}{rate:>12.1f}", flush=True)
    if args.json:
        bench.write_json(args.json, transformers=transformers.__version__, results=results)


if __name__ == "__main__":
    main()
