"""Which part of a full checkpoint tensor each rank's FusedMoE keeps, and
where in the layer it goes: the expert tensor names a checkpoint may use, vLLM's
name mapping, and the copies behind ``FusedMoE.weight_loader``. Functions of
the layer's sizes and ranks only (they take the layer for its attributes), so
the layer builds on this module and nothing here knows the layer's class.

Accepted expert tensors, named relative to a FusedMoE layer:

- per expert, nn.Linear layout ``[out, in]``: ``{e}.w1.weight`` (gate),
  ``{e}.w3.weight`` (up), ``{e}.w2.weight`` (down), as Mixtral names them, or
  ``{e}.gate_proj / up_proj / down_proj.weight`` (Qwen, DeepSeek, OLMoE), and
  the same with ``.bias``;
- whole layer, as transformers 5 stores them: ``gate_up_proj`` [E, 2I, H] or
  transposed [E, H, 2I], ``down_proj`` [E, H, I] or [E, I, H], and
  ``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H];
- the layer's own unsharded state dict: ``w13_weight`` [E, 2I, H],
  ``w2_weight``, ``w13_bias``, ``w2_bias``.

Tensors are always the full, unsharded ones; each rank keeps its part: rows
I*r/tp .. I*(r+1)/tp of gate and of up (a contiguous block of gate/up pairs
for ``swigluoai``, whose w13 interleaves them as gpt-oss does: w1 fills the
even rows, w3 the odd ones), the same columns of down; the down bias whole,
on TP rank 0 only. A layer without ``is_act_and_mul`` has one input
projection, named w1 or w3 (Nemotron-H calls it up_proj).
"""

from __future__ import annotations

import re

import torch

from .parallel import initial_physical_to_logical

# Checkpoint names of (gate, down, up) per expert that loading recognises.
PER_EXPERT_NAMES = (("w1", "w2", "w3"), ("gate_proj", "down_proj", "up_proj"))

# Whole-layer tensors: name -> (parameter, shard id).
WHOLE_LAYER_NAMES = {
    "gate_up_proj": ("w13_weight", "w13"),
    "down_proj": ("w2_weight", "w2"),
    "gate_up_proj_bias": ("w13_bias", "w13"),
    "down_proj_bias": ("w2_bias", "w2"),
    "w13_weight": ("w13_weight", "w13"),
    "w2_weight": ("w2_weight", "w2"),
    "w13_bias": ("w13_bias", "w13"),
    "w2_bias": ("w2_bias", "w2"),
}
_OWN_NAMES = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def make_expert_params_mapping(ckpt_gate_proj_name: str, ckpt_down_proj_name: str,
                               ckpt_up_proj_name: str, num_experts: int,
                               num_redundant_experts: int = 0
                               ) -> list[tuple[str, str, int, str]]:
    """``[(param_name, weight_name, expert_id, shard_id)]``, vLLM's convention:
    a checkpoint name containing ``weight_name`` (``"experts.{e}.{ckpt}."``)
    loads into the parameter named by replacing it with ``param_name``
    (``"experts.w13_"`` or ``"experts.w2_"``, followed by ``weight``/``bias``).
    ``expert_id`` is the physical expert; with redundant experts, each logical
    expert's tensors appear once per replica."""
    physical_to_logical = initial_physical_to_logical(num_experts, num_redundant_experts)
    shards = (("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name), ("w3", ckpt_up_proj_name))
    return [
        ("experts.w2_" if shard_id == "w2" else "experts.w13_",
         f"experts.{logical}.{ckpt_name}.", physical, shard_id)
        for physical, logical in enumerate(physical_to_logical.tolist())
        for shard_id, ckpt_name in shards
    ]


def expert_checkpoint_names(num_experts: int, num_redundant_experts: int = 0
                            ) -> dict[str, list[tuple[str, int, str]]]:
    """The mappings of every naming in PER_EXPERT_NAMES, keyed by weight_name:
    ``{"experts.{e}.{ckpt}.": [(param_name, expert_id, shard_id), ...]}``."""
    table = {}
    for gate, down, up in PER_EXPERT_NAMES:
        mapping = make_expert_params_mapping(gate, down, up, num_experts, num_redundant_experts)
        for param_name, weight_name, expert_id, shard_id in mapping:
            table.setdefault(weight_name, []).append((param_name, expert_id, shard_id))
    return table



_PER_EXPERT = re.compile(r"(\d+)\.(\w+)\.(weight|bias)")


def targets(layer, relative: str, name: str) -> list[tuple[str, str, int | None]]:
    """(parameter name, shard_id, expert_id) of every place the tensor named
    ``relative`` (to the layer; ``name`` in full, for errors) goes in ``layer``."""
    if relative in WHOLE_LAYER_NAMES:
        param_name, shard_id = WHOLE_LAYER_NAMES[relative]
        return [(param_name, shard_id, None)]
    match = _PER_EXPERT.fullmatch(relative)
    entries = layer.checkpoint_names.get(f"experts.{match[1]}.{match[2]}.") if match else None
    if not entries:
        raise ValueError(f"{name}: not an expert tensor of FusedMoE: expected {{e}}.{{w1|w2|w3|"
                         f"gate_proj|up_proj|down_proj}}.{{weight|bias}} with e < "
                         f"{layer.num_experts}, or one of {sorted(WHOLE_LAYER_NAMES)}")
    return [(param_name[len("experts."):] + match[3], shard_id, expert_id)
            for param_name, expert_id, shard_id in entries]


# --- weight_loader ------------------------------------------------------------------


def load_expert_weight(layer, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                       weight_name: str, shard_id: str, expert_id: int | None) -> bool:
    """Copies this rank's part of ``loaded_weight`` into ``param`` of ``layer``;
    False when expert ``expert_id`` (physical, global) is on another rank.

    With ``expert_id`` None, ``loaded_weight`` holds every logical expert (a
    leading [E] dimension) and fills all local experts, replicas included.
    """
    role = _role(layer, param)
    _check_shard_id(role, shard_id)
    whole = expert_id is None
    full = _full_layout(layer, role, loaded_weight, weight_name, shard_id, expert_id)
    if role == "w2_bias" and layer.tp_rank != 0:
        # Stays zero: the TP ranks' outputs are summed, the bias is added by rank 0 only.
        return whole or _local_slot(layer, expert_id) is not None
    if whole:
        # Slot by slot from views of the checkpoint tensor: no gathered copy
        # of every local expert on the way.
        for slot, logical in enumerate(layer.local_logical_experts.tolist()):
            _copy_shard(layer, param.data[slot:slot + 1], full[logical:logical + 1], role,
                        shard_id)
        return True
    slot = _local_slot(layer, expert_id)
    if slot is None:
        return False
    _copy_shard(layer, param.data[slot:slot + 1], full.unsqueeze(0), role, shard_id)
    return True


def _role(layer, param):
    for name in _OWN_NAMES:
        if getattr(layer, name, None) is param:
            return name
    raise ValueError("FusedMoE.weight_loader: param is not one of this layer's parameters "
                     f"{_OWN_NAMES}")


def _check_shard_id(role, shard_id):
    allowed = ("w2",) if role.startswith("w2") else ("w1", "w3", "w13")
    if shard_id not in allowed:
        raise ValueError(f"FusedMoE.weight_loader: shard_id={shard_id!r} for {role}: expected one "
                         f"of {allowed}")


def _local_slot(layer, expert_id):
    if not isinstance(expert_id, int) or not 0 <= expert_id < layer.num_physical_experts:
        raise ValueError(f"FusedMoE.weight_loader: expert_id={expert_id!r}: expected an int in "
                         f"[0, {layer.num_physical_experts})")
    return layer.local_slot_of.get(expert_id)


def _full_shape(layer, role, shard_id):
    """Unsharded [out, in] (weights) or [out] (biases) of one expert's tensor."""
    inter = layer.intermediate_size
    if role.startswith("w2"):
        shape = (layer.hidden_size, inter)
    else:
        gated = layer.is_act_and_mul and shard_id == "w13"
        shape = (2 * inter if gated else inter, layer.hidden_size)
    return shape[:1] if role.endswith("bias") else shape


def _full_layout(layer, role, loaded, weight_name, shard_id, expert_id):
    """``loaded`` in the layer's layout ([E,] out, in), after checking its shape."""
    whole = expert_id is None
    shape = _full_shape(layer, role, shard_id)
    lead = (layer.num_experts,) if whole else ()
    expected = lead + shape
    if tuple(loaded.shape) == expected and not _stored_transposed(layer, weight_name, shape, whole):
        return loaded
    transposed = lead + shape[::-1]
    if len(shape) == 2 and whole and tuple(loaded.shape) == transposed:
        return loaded.transpose(-1, -2)
    which = "for every expert (expert_id=None)" if whole else f"for expert_id={expert_id}"
    raise ValueError(f"FusedMoE.weight_loader: {weight_name} (shard_id={shard_id!r}) has shape "
                     f"{list(loaded.shape)}, expected {list(expected)} {which}")


def _stored_transposed(layer, weight_name, shape, whole):
    """A square whole-layer tensor fits both layouts. transformers 5 stores
    gpt-oss (the swigluoai model) as [E, in, out]; the others as [E, out, in],
    like this layer's own parameters."""
    own = weight_name.rsplit(".", 1)[-1] in _OWN_NAMES
    square = len(shape) == 2 and shape[0] == shape[1]
    return whole and square and not own and layer.activation == "swigluoai"


def _copy_shard(layer, dst, full, role, shard_id):
    """Copies this TP rank's part of ``full`` [n, out(, in)] into ``dst``."""
    if role.startswith("w2"):
        # Down projection: the input (intermediate) columns are sharded; the bias is whole.
        dst.copy_(_tp_slice(layer, full, 2) if role == "w2_weight" else full)
    elif shard_id == "w13" and layer.is_act_and_mul and not _interleaved(layer):
        # Gate rows then up rows: this rank keeps its slice of each half.
        gate, up = (_tp_slice(layer, half, 1) for half in full.chunk(2, dim=1))
        dst[:, :gate.shape[1]].copy_(gate)
        dst[:, gate.shape[1]:].copy_(up)
    elif shard_id == "w13" or not layer.is_act_and_mul:
        # One projection, or (gate, up) row pairs: one contiguous slice, pairs
        # intact since the slice is 2 * I / tp_size rows.
        dst.copy_(_tp_slice(layer, full, 1))
    else:
        part = _tp_slice(layer, full, 1)
        half = 0 if shard_id == "w1" else 1
        rows = part.shape[1]
        dst = dst[:, half::2] if _interleaved(layer) else dst[:, half * rows:(half + 1) * rows]
        dst.copy_(part)


def _interleaved(layer):
    return layer.activation == "swigluoai"


def _tp_slice(layer, t, dim):
    """This TP rank's slice of the intermediate dimension ``dim`` of ``t``."""
    size = t.shape[dim] // layer.tp_size
    return t.narrow(dim, layer.tp_rank * size, size)
