"""Expert and tensor parallelism: which rank holds which expert, the replica
maps of EPLB (redundant experts), and the collectives that join the ranks'
partial results.

Layout of a group of ``tp_size * ep_size`` ranks: TP ranks are neighbours,
``rank = ep_rank * tp_size + tp_rank``. Every rank sees the same tokens; each
computes its experts (EP) on its slice of the intermediate dimension (TP),
and the sum of all ranks' outputs is the layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

EXPERT_PLACEMENT_STRATEGIES = ("linear", "round_robin")

# torch 2.14 renamed the single-tensor collectives; 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- expert placement -------------------------------------------------------------


def expert_owners(ep_size: int, num_experts: int,
                  expert_placement_strategy: str = "linear") -> torch.Tensor:
    """EP rank of every expert, int64 [num_experts].

    ``linear``: contiguous blocks, the first ``num_experts % ep_size`` ranks
    hold one expert more. ``round_robin``: rank r holds r, r + ep_size, ...
    """
    if expert_placement_strategy not in EXPERT_PLACEMENT_STRATEGIES:
        raise ValueError(f"expert_placement_strategy={expert_placement_strategy!r}: expected one "
                         f"of {EXPERT_PLACEMENT_STRATEGIES}")
    if not 1 <= ep_size <= num_experts:
        raise ValueError(f"ep_size={ep_size}: expected 1 <= ep_size <= the number of (physical) "
                         f"experts {num_experts}, so that every rank holds an expert")
    experts = torch.arange(num_experts)
    if expert_placement_strategy == "round_robin":
        return experts % ep_size
    base, extra = divmod(num_experts, ep_size)
    sizes = torch.tensor([base + (r < extra) for r in range(ep_size)])
    return torch.repeat_interleave(torch.arange(ep_size), sizes)


def determine_expert_map(ep_size: int, ep_rank: int, global_num_experts: int,
                         expert_placement_strategy: str = "linear"
                         ) -> tuple[int, torch.Tensor | None]:
    """(local_num_experts, expert_map) of rank ``ep_rank``.

    ``expert_map`` int32 [global_num_experts] maps a global expert id to its
    local index on this rank (local experts keep the order of their global
    ids), -1 for experts held elsewhere; None when ``ep_size == 1``.
    """
    owners = expert_owners(ep_size, global_num_experts, expert_placement_strategy)
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank}: expected 0 <= ep_rank < ep_size={ep_size}")
    if ep_size == 1:
        return global_num_experts, None
    mine = owners == ep_rank
    local_num_experts = int(mine.sum())
    expert_map = torch.full((global_num_experts,), -1, dtype=torch.int32)
    expert_map[mine] = torch.arange(local_num_experts, dtype=torch.int32)
    return local_num_experts, expert_map


# --- EPLB: redundant experts ------------------------------------------------------


def initial_physical_to_logical(num_experts: int, num_redundant_experts: int = 0) -> torch.Tensor:
    """Logical expert held by each of the ``num_experts + num_redundant_experts``
    physical experts, int64: physical p < E holds p, the redundant ones hold
    replicas of logical (p - E) % E."""
    if num_redundant_experts < 0:
        raise ValueError(f"num_redundant_experts={num_redundant_experts}: expected >= 0")
    return torch.arange(num_experts + num_redundant_experts) % num_experts


def replica_table(physical_to_logical: torch.Tensor, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(table int32 [E, max_replicas], counts int32 [E]): the physical ids
    holding each logical expert, ascending, padded with -1."""
    p2l = physical_to_logical.long()
    counts = torch.bincount(p2l, minlength=num_experts)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"physical_to_logical: logical experts {missing} have no physical expert")
    order = torch.sort(p2l, stable=True).indices  # physical ids grouped by logical
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(p2l.numel()) - first[p2l[order]]
    table = torch.full((num_experts, int(counts.max())), -1, dtype=torch.int32)
    table[p2l[order], slot] = order.to(torch.int32)
    return table, counts.to(torch.int32)


def choose_replicas(topk_ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor
                    ) -> torch.Tensor:
    """Physical ids, int32 [M, K], for logical ``topk_ids`` [M, K]: token t uses
    replica ``t % num_replicas`` of each of its experts. Deterministic, spreads
    the tokens of a hot expert over its replicas, and stays on the device."""
    ids = topk_ids.long()
    token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
    replica = token % counts[ids]
    return table[ids, replica]


def record_expert_load(expert_load: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Adds the number of slots routed to each logical expert to ``expert_load``
    (int64 [E]). index_add_ has a fixed output size, unlike bincount on CUDA,
    which reads the largest id back to the host."""
    ids = topk_ids.reshape(-1).long()
    expert_load.index_add_(0, ids, torch.ones_like(ids))


# --- process groups ---------------------------------------------------------------


@dataclass(frozen=True)
class ParallelConfig:
    """This rank's place in a tp_size x ep_size group (resolve_parallel)."""

    tp_size: int
    tp_rank: int
    ep_size: int
    ep_rank: int
    group_size: int  # ranks of the process group in use; 1 without torch.distributed


def group_size_rank(process_group=None) -> tuple[int, int] | None:
    """(size, rank) of ``process_group`` (default group when None), or None
    when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised: "
                             "expected dist.init_process_group(...) first")
        return None
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def resolve_parallel(tp_size=None, tp_rank=None, ep_size=None, ep_rank=None,
                     process_group=None) -> ParallelConfig:
    """Fills in unset TP/EP sizes and ranks.

    Without torch.distributed: sizes 1, ranks 0. With it, from the group of
    size W (``process_group`` or the default group): no size given -> tp = W,
    ep = 1; one given -> the other is W // it. Given sizes are used as they are
    (emulating ranks in one process needs that); ranks taken from the group
    need tp_size * ep_size == W, and then tp_rank = r % tp_size,
    ep_rank = r // tp_size for the rank r in the group.
    """
    group = group_size_rank(process_group)
    world, rank = group if group is not None else (1, 0)
    if group is not None and (tp_size is None or ep_size is None):
        tp_size, ep_size = _fill_sizes(tp_size, ep_size, world)
    tp_size = 1 if tp_size is None else tp_size
    ep_size = 1 if ep_size is None else ep_size
    for name, size in (("tp_size", tp_size), ("ep_size", ep_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={size!r}: expected a positive int")
    if group is not None and (tp_rank is None or ep_rank is None) and tp_size * ep_size != world:
        raise ValueError(f"tp_size={tp_size} x ep_size={ep_size}: ranks taken from the process "
                         f"group need tp_size * ep_size == its size {world}")
    tp_rank = rank % tp_size if tp_rank is None else tp_rank
    ep_rank = rank // tp_size if ep_rank is None else ep_rank
    for name, r, size in (("tp_rank", tp_rank, tp_size), ("ep_rank", ep_rank, ep_size)):
        if not 0 <= r < size:
            raise ValueError(f"{name}={r}: expected 0 <= {name} < {size}")
    return ParallelConfig(tp_size, tp_rank, ep_size, ep_rank, world)


def _fill_sizes(tp_size, ep_size, world):
    if tp_size is None and ep_size is None:
        return world, 1
    given, name = (tp_size, "tp_size") if ep_size is None else (ep_size, "ep_size")
    if not isinstance(given, int) or given < 1 or world % given:
        raise ValueError(f"{name}={given!r}: expected a divisor of the process group size {world}")
    other = world // given
    return (given, other) if ep_size is None else (other, given)


# --- collectives ------------------------------------------------------------------


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sums ``x`` over the group, in place, and returns it: for ranks that hold
    the same tokens and partial results (TP slices, EP expert subsets)."""
    dist.all_reduce(x, group=group)
    return x


def all_gather_tokens(x: torch.Tensor, group=None) -> torch.Tensor:
    """[M, ...] on each rank -> [W * M, ...], rank order: for ranks that hold
    different tokens (data parallel) before an expert-parallel layer. Every
    rank must hold the same M (pad if needed): sizes are not exchanged, so
    nothing waits on the host."""
    x = x.contiguous()  # the collectives take dense buffers: the one copy that stays
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out


def reduce_scatter(x: torch.Tensor, group=None) -> torch.Tensor:
    """[W * M, ...] partial results -> [M, ...] sums of this rank's rows: the
    inverse of all_gather_tokens after the layer."""
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: x has {x.shape[0]} rows, expected a multiple of the "
                         f"group size {world}")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    return out
