"""One DeepSeek-V3 MoE layer, expert-parallel over N ranks, data-parallel
tokens (as serving engines run EP): each rank all-gathers every rank's tokens
and router logits, runs its own experts on all of them, and reduce-scatters
the partial outputs so that each rank gets its own tokens' outputs. Times the
step and its communication alone, and checks every rank's output against the
unsharded layer (ep_size=1) on the same tokens.

    torchrun --nproc-per-node 8 benchmarks/bench_ep.py [--json PATH]
    python benchmarks/bench_ep.py --nproc 8            # spawns its own ranks
    python benchmarks/bench_ep.py --small --cpu --nproc 2 --tokens 3,17

NCCL with one GPU per rank when CUDA is available, else (or with --cpu) gloo.
Exits non-zero when any configuration fails its check.
"""

import os

# NVLink multicast (NVLS, symmetric memory) off unless the environment sets these:
# the collectives here do not need it, and not every multi-GPU host supports it.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from fused_moe import FusedMoE, bench  # noqa: E402
from fused_moe.parallel import (  # noqa: E402
    EXPERT_PLACEMENT_STRATEGIES,
    all_gather_tokens,
    reduce_scatter,
)

# DeepSeek-V3's routing: sigmoid scores, grouped top-k, scaled weights.
ROUTING = bench.LAYER_OPTIONS["deepseek-v3"]
# Sizes and routing groups: DeepSeek-V3's MoE layer, and a tiny one for CPU tests.
DEEPSEEK_V3 = dict(zip(("num_experts", "top_k", "hidden_size", "intermediate_size"),
                       bench.MODELS["deepseek-v3"]),
                   num_expert_group=ROUTING["num_expert_group"], topk_group=ROUTING["topk_group"])
SMALL = dict(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32,
             num_expert_group=4, topk_group=2)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Relative Frobenius error of the EP output against the unsharded layer: bf16
# rounds each rank's partial output and the sums of the reduce-scatter.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
# A rank that fails leaves the others in a collective: a timeout ends them.
TIMEOUT = datetime.timedelta(minutes=5)


def int_list(text):
    return [int(v) for v in text.split(",")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int_list, default=[1, 64, 1024, 8192],
                        help="tokens per rank, comma-separated")
    parser.add_argument("--placements", default="linear,round_robin",
                        help="expert placements, a subset of "
                             f"{','.join(EXPERT_PLACEMENT_STRATEGIES)}")
    parser.add_argument("--redundant", type=int_list, default=None,
                        help="EPLB redundant experts, 0 = no EPLB (default 0,32; 0,4 with --small)")
    parser.add_argument("--iters", type=int, default=20,
                        help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--json", metavar="PATH", help="rank 0 writes the results here")
    parser.add_argument("--small", action="store_true",
                        help="a tiny layer (E=16, K=4, H=64, I=32, groups 4/2) for CPU/gloo tests")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks to spawn when not launched by torchrun")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even with CUDA")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default bf16 on GPUs, fp32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.placements = args.placements.split(",")
    unknown = set(args.placements) - set(EXPERT_PLACEMENT_STRATEGIES)
    if unknown:
        parser.error(f"--placements: unknown {sorted(unknown)}, expected one of "
                     f"{EXPERT_PLACEMENT_STRATEGIES}")
    if args.redundant is None:
        args.redundant = [0, 4] if args.small else [0, 32]
    if min(args.tokens) < 1 or args.iters < 1 or args.warmup < 0 or args.nproc < 1:
        parser.error("--tokens and --iters must be >= 1, --warmup >= 0, --nproc >= 1")
    return args


# --- launching --------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:  # torchrun set the rank, world size and rendezvous
        sys.exit(run_rank(args))
    port = free_port()
    if args.nproc == 1:
        set_rank_env(0, args.nproc, port)
        sys.exit(run_rank(args))
    # Ranks report a failed check through this flag and end normally: a rank
    # that exits non-zero makes mp.spawn kill the others mid-teardown.
    failed = mp.get_context("spawn").Event()
    try:
        mp.spawn(spawned_rank, args=(args, port, failed), nprocs=args.nproc)
    except mp.ProcessRaisedException as e:  # the rank's traceback is in the message
        sys.exit(f"bench_ep.py: {e}")
    sys.exit(1 if failed.is_set() else 0)


def free_port():
    # Port 0 lets the OS pick a free one; the ranks bind it right after.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_rank(rank, args, port, failed):
    set_rank_env(rank, args.nproc, port)
    if run_rank(args):
        failed.set()


def set_rank_env(rank, world, port):
    # The environment torchrun would give, so that both launches take one path.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def run_rank(args):
    """Joins the group, benchmarks, and (rank 0) reports; 1 when a check failed."""
    device = pick_device(args)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        results = bench_all(args, device)
        if dist.get_rank() == 0:
            print(format_table(results), flush=True)
            if args.json:
                write_json(args, results, device)
    finally:
        # Objects still holding the process group must go before it: a gloo
        # group freed during interpreter exit aborts the process.
        gc.collect()
        dist.destroy_process_group()
    return 0 if all(r["passed"] for r in results) else 1


def pick_device(args):
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu or not torch.cuda.is_available():
        # Ranks share the cores; more threads than cores each would thrash.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank}: only {torch.cuda.device_count()} GPUs; "
                           "run at most one rank per GPU (or --cpu)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


# --- the layer and its data -------------------------------------------------------


def bench_all(args, device):
    """Every (placement, redundant) configuration x every token count."""
    shape = SMALL if args.small else DEEPSEEK_V3
    dtype = layer_dtype(args, device)
    gen = torch.Generator(device).manual_seed(args.seed)
    bias = torch.randn(shape["num_experts"], generator=gen, device=device) * 0.1
    reference = make_layer(shape, dtype, bias, device)
    reference.load_weights(random_checkpoint(shape, dtype, device, gen))
    # The reference's parameters are the full checkpoint: one copy of it (22.5 GB
    # of bf16 for DeepSeek-V3) serves every EP layer below.
    checkpoint = {"w13_weight": reference.w13_weight, "w2_weight": reference.w2_weight}
    check_same_on_ranks("checkpoint", [bias, *checkpoint.values()])
    inputs = {t: rank_tokens(shape, dtype, device, args.seed + 1 + t, t) for t in args.tokens}
    # Routing is per token and the ops give the same bits whatever the batch,
    # so the unsharded layer on this rank's tokens is its slice of the whole batch.
    expected = {t: reference(*inputs[t]) for t in args.tokens}
    results = []
    for placement, redundant in itertools.product(args.placements, args.redundant):
        layer = make_layer(shape, dtype, bias, device, placement=placement, redundant=redundant)
        layer.load_weights(checkpoint.items())
        config = placement + (f"+eplb{redundant}" if redundant else "")
        for t in args.tokens:
            row = bench_one(layer, *inputs[t], expected[t], args)
            results.append(dict(config=config, placement=placement, redundant=redundant,
                                tokens_per_rank=t, **row))
            report(results[-1], dtype)
        del layer
        free_memory(device)
    return results


def layer_dtype(args, device):
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_layer(shape, dtype, bias, device, placement=None, redundant=0):
    """The DeepSeek-V3 routing; unsharded (ep_size=1) unless a placement is given."""
    sharded = placement is not None
    return FusedMoE(
        **{**ROUTING, **shape}, params_dtype=dtype, e_score_correction_bias=bias, renormalize=True,
        ep_size=dist.get_world_size() if sharded else 1, ep_rank=dist.get_rank() if sharded else 0,
        tp_size=1, tp_rank=0, process_group=dist.group.WORLD if sharded else None,
        expert_placement_strategy=placement or "linear", enable_eplb=bool(redundant),
        num_redundant_experts=redundant, reduce_results=False, device=device)


def random_checkpoint(shape, dtype, device, gen):
    """(name, tensor) of the full layer, drawn on ``device`` in ``dtype``: no
    fp32 or host copy (DeepSeek-V3's experts are 45 GB in fp32), and one tensor
    alive at a time while the reference loads them. Scaled so outputs are O(1)."""
    e, h, i = shape["num_experts"], shape["hidden_size"], shape["intermediate_size"]
    yield "w13_weight", torch.randn(e, 2 * i, h, generator=gen, device=device,
                                    dtype=dtype).mul_(h ** -0.5)
    yield "w2_weight", torch.randn(e, h, i, generator=gen, device=device,
                                   dtype=dtype).mul_(i ** -0.5)


def rank_tokens(shape, dtype, device, seed, tokens):
    """This rank's (hidden states, router logits): every rank draws the same
    global batch from ``seed`` and keeps its own ``tokens`` rows."""
    gen = torch.Generator(device).manual_seed(seed)
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(world * tokens, shape["hidden_size"], generator=gen, device=device,
                    dtype=dtype)
    logits = torch.randn(world * tokens, shape["num_experts"], generator=gen, device=device)
    check_same_on_ranks("tokens", [x, logits])
    rows = slice(rank * tokens, (rank + 1) * tokens)
    return x[rows].clone(), logits[rows].clone()


def check_same_on_ranks(what, tensors):
    """Raises unless every rank drew the same ``tensors`` (seeded generators on
    different GPUs should agree; the correctness check relies on it)."""
    # A strided sample keeps this cheap on 15 GB tensors.
    sample = torch.stack([t.flatten()[::997].double().sum() for t in tensors])
    low, high = sample.clone(), sample.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"rank {dist.get_rank()}: the ranks drew different {what} from one seed")


# --- one step ---------------------------------------------------------------------


def ep_step(layer, x, logits):
    """Gather every rank's tokens, run the local experts, return this rank's sums."""
    partial = layer(all_gather_tokens(x), all_gather_tokens(logits))
    return reduce_scatter(partial)


def comm_step(x, logits, partial):
    """The collectives of ep_step alone, on tensors of the same sizes."""
    all_gather_tokens(x)
    all_gather_tokens(logits)
    return reduce_scatter(partial)


def bench_one(layer, x, logits, expected, args):
    out = ep_step(layer, x, logits)
    partial = torch.zeros(dist.get_world_size() * x.shape[0], x.shape[1], dtype=out.dtype,
                          device=out.device)
    step_us = median_us(lambda: ep_step(layer, x, logits), args, x.device)
    comm_us = median_us(lambda: comm_step(x, logits, partial), args, x.device)
    # The slowest rank sets the step time and the error: every rank reports the max.
    worst = torch.tensor([step_us, comm_us, rel_err(out, expected)], dtype=torch.float64,
                         device=out.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    step_us, comm_us, err = worst.tolist()
    return dict(step_us=step_us, comm_us=comm_us, comm_share=comm_us / step_us, rel_err=err,
                passed=err <= TOLERANCE[out.dtype])  # NaN fails too


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def median_us(fn, args, device):
    """Median over ``args.iters`` steps after ``args.warmup``, each started
    together on every rank (a barrier), in microseconds."""
    for _ in range(args.warmup):
        fn()
    return statistics.median(timed_us(fn, device) for _ in range(args.iters))


def timed_us(fn, device):
    dist.barrier()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    torch.cuda.synchronize(device)  # the barrier's own kernel is not part of the step
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def free_memory(device):
    gc.collect()  # whatever cycles still hold the last configuration's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- output -----------------------------------------------------------------------


def report(row, dtype):
    if dist.get_rank() == 0:
        verdict = "PASS" if row["passed"] else "FAIL"
        print(f"{verdict} {row['config']} tokens/rank={row['tokens_per_rank']} "
              f"rel_err={row['rel_err']:.2e} (tolerance {TOLERANCE[dtype]:.0e})", flush=True)


def format_table(results):
    head = f"{'config':<22}{'tokens/rank':>12}{'step us':>12}{'comm us':>12}{'comm %':>8}" \
           f"{'rel err':>10}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['config']:<22}{r['tokens_per_rank']:>12}{r['step_us']:>12.1f}"
                     f"{r['comm_us']:>12.1f}{100 * r['comm_share']:>8.1f}{r['rel_err']:>10.2e}"
                     f"  {'PASS' if r['passed'] else 'FAIL'}")
    return "\n".join(lines)


def nccl_version(device):
    return ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None


def write_json(args, results, device):
    bench.write_json(args.json, device=device, world_size=dist.get_world_size(),
                     backend=dist.get_backend(),
                     dtype=str(layer_dtype(args, device)).removeprefix("torch."),
                     nccl=nccl_version(device), shape=SMALL if args.small else DEEPSEEK_V3,
                     iters=args.iters, results=results)


if __name__ == "__main__":
    main()
