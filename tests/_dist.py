"""Helpers of the FusedMoE layer tests: random full checkpoints, every rank's
layer built from one (emulated in one process), and the scenarios that run on
several processes (spawned, gloo on CPU or NCCL on GPUs).

Spawned processes import this module, not the test files, so it imports only
torch and fused_moe."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_moe import reference
from fused_moe.layer import FusedMoE
from fused_moe.parallel import all_gather_tokens, all_reduce, reduce_scatter

E, K, H, I = 8, 2, 48, 40  # experts, top-k, hidden, intermediate (I/4 is odd on purpose)


def random_checkpoint(num_experts=E, hidden=H, inter=I, *, gated=True, bias=True,
                      dtype=torch.float32, gen=None) -> dict[str, torch.Tensor]:
    """A full layer in the layer's own names and layout, scaled so that
    outputs are O(1)."""
    rows = 2 * inter if gated else inter
    full = {"w13_weight": torch.randn(num_experts, rows, hidden, generator=gen) / hidden**0.5,
            "w2_weight": torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5}
    if bias:
        full["w13_bias"] = 0.3 * torch.randn(num_experts, rows, generator=gen)
        full["w2_bias"] = 0.3 * torch.randn(num_experts, hidden, generator=gen)
    return {name: t.to(dtype) for name, t in full.items()}


def build(full, *, device=None, **kwargs) -> FusedMoE:
    """A layer for ``full`` (the rank's part of it, by kwargs), loaded."""
    gated = kwargs.get("is_act_and_mul", True)
    rows, hidden = full["w13_weight"].shape[1:]
    layer = FusedMoE(kwargs.pop("num_experts", full["w13_weight"].shape[0]),
                     kwargs.pop("top_k", K), hidden, rows // 2 if gated else rows,
                     params_dtype=full["w13_weight"].dtype, has_bias="w13_bias" in full,
                     device=device, **kwargs)
    assert layer.load_weights(full.items()) == set(full)
    return layer


def emulated_ranks(full, tp_size, ep_size, **kwargs) -> list[FusedMoE]:
    """Every rank's layer of a tp_size x ep_size group, in one process."""
    return [build(full, tp_size=tp_size, tp_rank=r % tp_size, ep_size=ep_size,
                  ep_rank=r // tp_size, **kwargs) for r in range(tp_size * ep_size)]


def reference_output(full, x, logits, top_k=K, routing=None, **expert_kwargs):
    """float64 [M, H] of the unsharded layer, by fused_moe.reference."""
    weights, ids = reference.fused_topk(logits, top_k, **(routing or {}))
    return reference.fused_experts(
        x, full["w13_weight"], full["w2_weight"], weights, ids,
        w13_bias=full.get("w13_bias"), w2_bias=full.get("w2_bias"), **expert_kwargs)


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


# --- several processes ------------------------------------------------------------


def spawn(fn, world_size, init_file, *args, backend="gloo"):
    """Runs ``fn(rank, world_size, device, *args)`` on ``world_size`` new
    processes joined by ``backend``; an exception in any fails the call."""
    mp.spawn(_entry, args=(fn, world_size, f"file://{init_file}", backend, args),
             nprocs=world_size)


def _entry(rank, fn, world_size, init_method, backend, args):
    torch.set_num_threads(1)  # the test machine may have fewer cores than ranks
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    # A rank that fails leaves the others in a collective: a timeout ends them (not 30 min).
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def layer_scenarios(rank, world_size, device, seed):
    """FusedMoE with sizes and ranks from the default group, reduce_results:
    every rank's output equals the unsharded reference."""
    gen = torch.Generator().manual_seed(seed)  # the same checkpoint and tokens on every rank
    x, logits = torch.randn(10, H, generator=gen), torch.randn(10, E, generator=gen)
    shared = torch.nn.Linear(H, H, dtype=torch.float32)
    torch.nn.init.normal_(shared.weight, std=H**-0.5, generator=gen)
    torch.nn.init.normal_(shared.bias, std=0.3, generator=gen)
    shared = shared.to(device)
    full = random_checkpoint(gen=gen)
    gpt_oss = random_checkpoint(gen=gen)
    cases = [
        (dict(), full, "silu", None),
        (dict(ep_size=world_size), full, "silu", None),
        (dict(tp_size=2, expert_placement_strategy="round_robin"), gpt_oss, "swigluoai", None),
        (dict(ep_size=world_size // 2 or 1, enable_eplb=True, num_redundant_experts=3),
         full, "gelu", shared),
    ]
    for kwargs, ckpt, activation, shared_experts in cases:
        layer = build({k: v.to(device) for k, v in ckpt.items()}, reduce_results=True,
                      activation=activation, shared_experts=shared_experts, device=device,
                      **kwargs)
        assert layer.tp_size * layer.ep_size == world_size
        assert (layer.tp_rank, layer.ep_rank) == (rank % layer.tp_size, rank // layer.tp_size)
        out = layer(x.to(device), logits.to(device))
        ref = reference_output(ckpt, x, logits, activation=activation)
        if shared_experts is not None:
            ref = ref + shared_experts(x.to(device)).double().cpu()
        err = rel_err(out, ref)
        assert err < 1e-5, f"rank {rank}, {kwargs}, {activation}: relative error {err:.2e}"
        if layer.enable_eplb:
            ids = reference.fused_topk(logits, K)[1].long()
            assert torch.equal(layer.expert_load.cpu(), torch.bincount(ids.flatten(), minlength=E))


def data_parallel_scenario(rank, world_size, device, seed):
    """Ranks with different tokens: all-gather them, run the expert-parallel
    layer, reduce-scatter the partial outputs back to the tokens' ranks."""
    gen = torch.Generator().manual_seed(seed + 1)
    full = random_checkpoint(gen=gen)
    x, logits = torch.randn(world_size, 6, H, generator=gen), torch.randn(world_size, 6, E,
                                                                        generator=gen)
    layer = build({k: v.to(device) for k, v in full.items()}, ep_size=world_size, device=device)
    tokens = all_gather_tokens(x[rank].to(device))
    out = reduce_scatter(layer(tokens, all_gather_tokens(logits[rank].to(device))))
    err = rel_err(out, reference_output(full, x[rank], logits[rank]))
    assert err < 1e-5, f"rank {rank}: relative error {err:.2e}"


def collective_scenarios(rank, world_size, device, seed):
    """all_gather_tokens, reduce_scatter, all_reduce against their definitions."""
    gen = torch.Generator().manual_seed(seed)
    per_rank = torch.randn(world_size, 3, 5, generator=gen)
    gathered = all_gather_tokens(per_rank[rank].to(device))
    torch.testing.assert_close(gathered.cpu(), per_rank.reshape(-1, 5))
    partial = torch.randn(world_size, world_size * 3, 5, generator=gen)
    mine = reduce_scatter(partial[rank].to(device))
    torch.testing.assert_close(mine.cpu(), partial.sum(0)[rank * 3:(rank + 1) * 3])
    summed = all_reduce(partial[rank].clone().to(device))
    torch.testing.assert_close(summed.cpu(), partial.sum(0))


def group_rule_scenarios(rank, world_size, device, seed):
    """Sizes that do not fit the group raise ValueError naming them."""
    for kwargs, words in ((dict(tp_size=3), "tp_size=3"),
                          (dict(tp_size=world_size, ep_size=2), "tp_size=")):
        try:
            FusedMoE(E, K, H, 48 * world_size, **kwargs)
        except ValueError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{kwargs} with {world_size} ranks did not raise")


def all_scenarios(rank, world_size, device, seed):
    layer_scenarios(rank, world_size, device, seed)
    data_parallel_scenario(rank, world_size, device, seed)
    collective_scenarios(rank, world_size, device, seed)
    group_rule_scenarios(rank, world_size, device, seed)
