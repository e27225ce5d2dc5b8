"""Pure-PyTorch float64 reference of every op: the oracle of the tests.

Written for clarity, not speed, and independently of the kernels: no code is
shared with them. Every function accepts tensors on any device and returns
float64 results (ids and indices as int32)."""

from __future__ import annotations

import math

import torch


def _rank(values: torch.Tensor) -> torch.Tensor:
    """Indices of ``values`` [..., n] best first: larger first, NaN last, ties
    to the lower index (two stable sorts)."""
    order = torch.sort(torch.nan_to_num(values, nan=-math.inf), dim=-1, descending=True,
                       stable=True).indices
    isnan = torch.gather(values.isnan(), -1, order).to(torch.int8)
    return torch.gather(order, -1, torch.sort(isnan, dim=-1, stable=True).indices)


def fused_topk(gating_output, topk, *, renormalize=True, scoring_func="softmax",
               e_score_correction_bias=None, num_expert_group=None, topk_group=None,
               routed_scaling_factor=1.0):
    logits = gating_output.double()
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    choice = scores.clone()
    if e_score_correction_bias is not None:
        choice = choice + e_score_correction_bias.double()
    if num_expert_group:
        m, e = choice.shape
        groups = choice.view(m, num_expert_group, e // num_expert_group)
        ranked = torch.gather(groups, -1, _rank(groups))
        if e_score_correction_bias is not None and groups.shape[-1] > 1:
            group_score = ranked[..., 0] + ranked[..., 1]
        else:
            group_score = ranked[..., 0]
        kept = _rank(group_score)[:, :topk_group]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        mask = keep.repeat_interleave(e // num_expert_group, dim=1)
        ids = _rank(choice)
        # Experts of dropped groups are never chosen: move them behind the kept ones.
        kept_first = torch.sort((~mask.gather(1, ids)).to(torch.int8), dim=1, stable=True).indices
        ids = ids.gather(1, kept_first)[:, :topk]
    else:
        ids = _rank(choice)[:, :topk]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def _local_ids(topk_ids, num_local_experts, expert_map):
    ids = topk_ids.long()
    if expert_map is None:
        return torch.where((ids >= 0) & (ids < num_local_experts), ids, -1)
    valid = (ids >= 0) & (ids < expert_map.numel())
    return torch.where(valid, expert_map.long()[ids.clamp(0, expert_map.numel() - 1)], -1)


def permute(hidden_states, topk_ids, num_local_experts, expert_map=None, row_weights=None):
    m, k = topk_ids.shape
    local = _local_ids(topk_ids, num_local_experts, expert_map).flatten()
    key = torch.where(local >= 0, local, num_local_experts)
    order = torch.sort(key, stable=True).indices  # slot of each output row
    x = hidden_states.double()
    if row_weights is not None:
        rows = x[order // k] * row_weights.double().flatten()[order, None]
    else:
        rows = x[order // k]
    rows[key[order] == num_local_experts] = 0
    counts = torch.bincount(local[local >= 0], minlength=num_local_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    inv = torch.empty(m * k, dtype=torch.long, device=topk_ids.device)
    inv[order] = torch.arange(m * k, device=topk_ids.device)
    inv = torch.where(local >= 0, inv, -1)
    return rows, offsets, inv.view(m, k).to(torch.int32)


def grouped_gemm(a, w, expert_offsets, bias=None):
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64, device=a.device)
    off = expert_offsets.tolist()
    for e in range(w.shape[0]):
        rows = slice(off[e], off[e + 1])
        out[rows] = a[rows].double() @ w[e].double().T
        if bias is not None:
            out[rows] += bias[e].double()
    return out


def _act(x, activation):
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "relu2":
        return torch.relu(x) ** 2
    raise ValueError(f"unknown activation {activation!r}")


def _swigluoai(gate, up, alpha=1.702, limit=7.0):
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def activation(x, activation, is_act_and_mul=True):
    x = x.double()
    if not is_act_and_mul:
        return _act(x, activation)
    if activation == "swigluoai":
        return _swigluoai(x[:, 0::2], x[:, 1::2])
    gate, up = x.chunk(2, dim=-1)
    return _act(gate, activation) * up


_activation = activation


def unpermute(y, inv_index, topk_weights=None):
    inv = inv_index.long()
    rows = y.double()[inv.clamp(min=0)]  # [M, K, H]
    w = torch.ones(inv.shape, dtype=torch.float64, device=y.device)
    if topk_weights is not None:
        w = topk_weights.double()
    w = torch.where(inv >= 0, w, 0.0)
    return (rows * w[..., None]).sum(dim=1)


def fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *, activation="silu",
                  is_act_and_mul=True, w13_bias=None, w2_bias=None, expert_map=None,
                  global_num_experts=None, apply_router_weight_on_input=False,
                  intermediate_dtype=None):
    """Loops over experts: each token's slots on expert e, computed directly from
    the formula in DESIGN.md (no permute).

    ``intermediate_dtype`` rounds the first GEMM's output, the activation and
    the second GEMM's output to that dtype, where the kernels store them: a
    sum that cancels (tiny H and I) then compares bit-level noise to noise."""
    x = hidden_states.double()
    rounded = (lambda t: t.to(intermediate_dtype).double()) if intermediate_dtype else (lambda t: t)
    out = torch.zeros_like(x)
    local = _local_ids(topk_ids, w13.shape[0], expert_map)
    weights = topk_weights.double()
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        w = weights[tok, slot][:, None]
        if apply_router_weight_on_input:
            xe = xe * w
        h = xe @ w13[e].double().T
        if w13_bias is not None:
            h = h + w13_bias[e].double()
        y = rounded(_activation(rounded(h), activation, is_act_and_mul)) @ w2[e].double().T
        if w2_bias is not None:
            y = y + w2_bias[e].double()
        y = rounded(y)
        out.index_add_(0, tok, y if apply_router_weight_on_input else y * w)
    return out
