"""fused_moe.parallel: expert placement, EPLB replica maps, the TP/EP sizes
taken from a process group, and the collectives and layer on real processes."""

import pytest
import torch

import _dist
from fused_moe.parallel import (
    choose_replicas,
    determine_expert_map,
    initial_physical_to_logical,
    record_expert_load,
    replica_table,
    resolve_parallel,
)


def test_linear_placement_gives_the_first_ranks_one_more():
    maps = [determine_expert_map(4, r, 10, "linear") for r in range(4)]
    assert [n for n, _ in maps] == [3, 3, 2, 2]
    assert maps[1][1].tolist() == [-1, -1, -1, 0, 1, 2, -1, -1, -1, -1]
    assert maps[3][1].tolist() == [-1] * 8 + [0, 1]
    assert maps[1][1].dtype == torch.int32


def test_round_robin_placement():
    n, expert_map = determine_expert_map(3, 1, 8, "round_robin")
    assert n == 3
    assert expert_map.tolist() == [-1, 0, -1, -1, 1, -1, -1, 2]


def test_one_rank_has_no_map():
    assert determine_expert_map(1, 0, 6) == (6, None)


@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
@pytest.mark.parametrize("num_experts,ep_size", [(8, 2), (7, 3), (5, 5), (64, 6)])
def test_every_expert_is_on_exactly_one_rank(strategy, num_experts, ep_size):
    maps = [determine_expert_map(ep_size, r, num_experts, strategy) for r in range(ep_size)]
    held = torch.stack([m >= 0 for _, m in maps]).sum(0)
    assert held.tolist() == [1] * num_experts
    for n, m in maps:
        assert sorted(m[m >= 0].tolist()) == list(range(n))
    assert max(n for n, _ in maps) - min(n for n, _ in maps) <= 1


@pytest.mark.parametrize("args,words", [
    ((4, 4, 8), "ep_rank=4"),
    ((4, -1, 8), "ep_rank=-1"),
    ((9, 0, 8), "ep_size=9"),
    ((0, 0, 8), "ep_size=0"),
    ((2, 0, 8, "random"), "expert_placement_strategy='random'"),
])
def test_bad_placement_raises(args, words):
    with pytest.raises(ValueError, match=words):
        determine_expert_map(*args)


def test_initial_physical_to_logical_appends_replicas():
    assert initial_physical_to_logical(4, 6).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert initial_physical_to_logical(3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="num_redundant_experts=-1"):
        initial_physical_to_logical(3, -1)


def test_replica_table_lists_each_logical_experts_copies():
    table, counts = replica_table(initial_physical_to_logical(4, 6), 4)
    assert table.tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, -1], [3, 7, -1]]
    assert counts.tolist() == [3, 3, 2, 2]
    with pytest.raises(ValueError, match=r"logical experts \[2\]"):
        replica_table(torch.tensor([0, 1, 1]), 3)


def test_choose_replicas_cycles_over_the_copies_by_token():
    physical_to_logical = initial_physical_to_logical(4, 6)
    table, counts = replica_table(physical_to_logical, 4)
    ids = torch.randint(0, 4, (50, 3), dtype=torch.int32)
    ids[:, 0] = 0
    physical = choose_replicas(ids, table, counts)
    assert physical.dtype == torch.int32
    assert torch.equal(physical_to_logical[physical.long()], ids.long())
    assert physical[:6, 0].tolist() == [0, 4, 8, 0, 4, 8]
    assert torch.equal(choose_replicas(ids, table, counts), physical)  # deterministic


def test_record_expert_load_accumulates_a_bincount():
    load = torch.zeros(6, dtype=torch.int64)
    first, second = torch.randint(0, 6, (20, 2)), torch.randint(0, 6, (7, 2))
    record_expert_load(load, first.int())
    record_expert_load(load, second.int())
    expected = torch.bincount(torch.cat([first, second]).flatten(), minlength=6)
    assert torch.equal(load, expected)


def test_sizes_without_torch_distributed_default_to_one_rank():
    config = resolve_parallel()
    assert (config.tp_size, config.tp_rank, config.ep_size, config.ep_rank) == (1, 0, 1, 0)
    config = resolve_parallel(tp_size=2, tp_rank=1, ep_size=4, ep_rank=3)
    assert (config.tp_size, config.tp_rank, config.ep_size, config.ep_rank) == (2, 1, 4, 3)
    assert config.group_size == 1


@pytest.mark.parametrize("kwargs,words", [
    (dict(tp_size=0), "tp_size=0"),
    (dict(ep_size=2.0), "ep_size=2.0"),
    (dict(tp_size=2, tp_rank=2), "tp_rank=2"),
    (dict(ep_rank=1), "ep_rank=1: expected 0 <= ep_rank < 1"),
    (dict(process_group=object()), "process_group"),
])
def test_bad_sizes_raise(kwargs, words):
    with pytest.raises(ValueError, match=words):
        resolve_parallel(**kwargs)


# --- several processes ------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_layer_and_collectives_on_processes(world_size, tmp_path):
    _dist.spawn(_dist.all_scenarios, world_size, tmp_path / "init",
                int(torch.randint(0, 2**31, ())))


@pytest.mark.distributed
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_layer_and_collectives_on_gpus_with_nccl(tmp_path):
    world_size = 4 if torch.cuda.device_count() >= 4 else 2
    _dist.spawn(_dist.all_scenarios, world_size, tmp_path / "init",
                int(torch.randint(0, 2**31, ())), backend="nccl")
