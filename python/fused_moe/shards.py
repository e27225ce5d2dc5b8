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
  ``w2_weight``, ``w13_bias``, ``w2_bias`` (and the scales below, named
  ``w13_`` / ``w2_`` + scale name, [E, ...]).

FP8 layers (``quant_config``) take fp8 (e4m3fn) weights with their fp32 (or
bf16) scales, per expert next to the weight, as DeepSeek-V3, compressed-tensors
and AutoFP8 name them: ``{e}.gate_proj.weight_scale_inv`` (block scales
[ceil(out/bn), ceil(in/bk)]; compressed-tensors calls block scales
``weight_scale``), ``{e}.w1.weight_scale`` (channel [out, 1] or [out], or
tensor, one element), ``{e}.w1.input_scale`` (static activations, one
element; w1's and w3's are one scale of the expert: the larger is kept, it
never saturates). A float weight in an FP8 layer is quantized as it loads
(online quantization, one expert at a time), then loaded like an fp8 one.

4-bit layers (mxfp4, int4) quantize float weights the same way (scales
``weight_scale``, asymmetric int4 zero points ``weight_zero_point``, [out,
in/group]), or take packed uint8 weights [out, in/2] with their scales, as
gpt-oss stores them whole: ``gate_up_proj_blocks`` [E, 2I, H/32, 16],
``gate_up_proj_scales`` [E, 2I, H/32] (e8m0), and ``down_proj_blocks`` /
``down_proj_scales``. int4 checkpoints load per expert under the names
vLLM's MoE int4 paths read (``{e}.gate_proj.<name>``), each tensor turned
into the layer's layout once, by fused_moe.quant.int4_checkpoint_tensor:
GPTQ ``qweight`` int32 [in/8, out], ``scales`` [in/g, out], ``qzeros`` int32
[in/g, out/8] and ``g_idx`` [in]; AWQ ``qweight`` [in, out/8], ``qzeros``,
``scales``; compressed-tensors ``weight_packed`` int32 [out, in/8],
``weight_scale`` [out, in/g], ``weight_zero_point`` int32 [out/8, in/g] and
``weight_shape`` [2]. ``g_idx`` and ``weight_shape`` are checked, not kept;
``qzeros`` of a symmetric layer are skipped (GPTQ writes them for every
checkpoint: zero 8).

Tensors are always the full, unsharded ones; each rank keeps its part: rows
I*r/tp .. I*(r+1)/tp of gate and of up (a contiguous block of gate/up pairs
for ``swigluoai``, whose w13 interleaves them as gpt-oss does: w1 fills the
even rows, w3 the odd ones), the same columns of down; the down bias whole,
on TP rank 0 only. A layer without ``is_act_and_mul`` has one input
projection, named w1 or w3 (Nemotron-H calls it up_proj).

Scales follow their weights: channel scales are cut like the rows they
scale, w2's kept whole; tensor scales are one per expert (w1's and w3's kept
apart, [E, 2]); block scales are cut on the block grid. Where a rank's
I/tp columns do not fill whole blocks (Qwen3-FP8 at tp 4: 192 of 128), the
rank's scales take a finer grid, ``local_block_shape``: each fine block lies
in one checkpoint block and takes its scale, so the weights are exactly the
checkpoint's; activations are then quantized per that finer bk.

4-bit weights shard the same way on their group grid: w13's rows with their
scales and zero points, w2's K (packed two a byte) with its groups, so I/tp
must be a multiple of the group and of 2 (``check_packed4_tp``); a group of
a whole row (group_size None) keeps w2's scales whole.
"""

from __future__ import annotations

import math
import re

import torch

from .parallel import initial_physical_to_logical
from .quant import FP8_DTYPE, check_trivial_g_idx, int4_checkpoint_tensor, quantize_weight

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
    # gpt-oss's mxfp4 tensors: blocks [E, N, K/32, 16] of packed e2m1, e8m0 scales [E, N, K/32].
    "gate_up_proj_blocks": ("w13_weight", "w13"),
    "down_proj_blocks": ("w2_weight", "w2"),
    "gate_up_proj_scales": ("w13_weight_scale", "w13"),
    "down_proj_scales": ("w2_weight_scale", "w2"),
}
# Scale names after a weight's name (``{e}.w1.<name>``, ``w13_<name>``).
SCALE_NAMES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_zero_point")
WHOLE_LAYER_NAMES.update({f"{p}_{n}": (f"{p}_{n}", p) for p in ("w13", "w2") for n in SCALE_NAMES})
# int4 checkpoints' per-expert tensor names -> the parameter suffix each loads into
# (g_idx and weight_shape go to the weight, where they are checked and not kept).
INT4_NAMES = {"qweight": "weight", "scales": "weight_scale", "qzeros": "weight_zero_point",
              "g_idx": "weight", "weight_packed": "weight", "weight_g_idx": "weight",
              "weight_shape": "weight", "weight_zero_point": "weight_zero_point"}
_CHECKED_ONLY = ("g_idx", "weight_g_idx", "weight_shape")
_WEIGHTS = ("w13_weight", "w2_weight")
_SCALES = tuple(f"{p}_{n}" for p in ("w13", "w2") for n in SCALE_NAMES)
_OWN_NAMES = ("w13_weight", "w2_weight", "w13_bias", "w2_bias") + _SCALES


def local_block_shape(block_shape: tuple[int, int], inter: int) -> tuple[int, int]:
    """The block grid of a rank holding ``inter`` (I/tp) intermediate columns:
    the checkpoint's (bn, bk), each side refined to gcd(b, inter) where inter
    is not a multiple of it, so that every rank's blocks lie in checkpoint
    blocks (gate/up halves and TP cuts fall on block edges)."""
    return tuple(b if inter % b == 0 else math.gcd(b, inter) for b in block_shape)


def weight_scale_name(config, weight: str) -> str:
    """The scale parameter of ``weight`` (w13_weight, w2_weight) under ``config``."""
    suffix = "weight_scale_inv" if config.weight_scale == "block" else "weight_scale"
    return f"{weight[:-len('weight')]}{suffix}"


def missing_param_message(name: str, param_name: str) -> str:
    if param_name.endswith("bias"):
        return (f"{name}: the layer has no {param_name}: expected has_bias=True for a "
                "checkpoint with expert biases")
    return (f"{name}: the layer has no {param_name}: expected a quant_config whose scheme has "
            "it (checkpoint scales: weight_scale_inv for block scales, weight_scale for "
            "channel or tensor ones)")


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



_PER_EXPERT = re.compile(r"(\d+)\.(\w+)\.(weight_scale_inv|weight_scale|input_scale|weight|bias|"
                         + "|".join(INT4_NAMES) + ")")


def targets(layer, relative: str, name: str) -> list[tuple[str, str, int | None]]:
    """(parameter name, shard_id, expert_id) of every place the tensor named
    ``relative`` (to the layer; ``name`` in full, for errors) goes in ``layer``.
    Input scales of a layer without static activations go nowhere: it
    computes its own."""
    if relative in WHOLE_LAYER_NAMES:
        param_name, shard_id = WHOLE_LAYER_NAMES[relative]
        found = [(_own_param_name(layer, param_name), shard_id, None)]
    else:
        match = _PER_EXPERT.fullmatch(relative)
        entries = layer.checkpoint_names.get(f"experts.{match[1]}.{match[2]}.") if match else None
        if not entries:
            raise ValueError(f"{name}: not an expert tensor of FusedMoE: expected {{e}}.{{w1|w2|"
                             f"w3|gate_proj|up_proj|down_proj}}.{{weight|bias|weight_scale|"
                             f"weight_scale_inv|input_scale|{'|'.join(INT4_NAMES)}}} with e < "
                             f"{layer.num_experts}, or "
                             f"one of {sorted(WHOLE_LAYER_NAMES)}")
        suffix = INT4_NAMES.get(match[3], match[3])
        found = [(_own_param_name(layer, param_name[len("experts."):] + suffix), shard_id,
                  expert_id) for param_name, expert_id, shard_id in entries]
    # Dropped where the layer has no such parameter: input scales of dynamic
    # activations (the layer computes its own), GPTQ's qzeros of a symmetric
    # checkpoint (zero 8, which a layer without zero points takes).
    optional = found[0][0].endswith("input_scale") or relative.endswith(".qzeros")
    if optional and getattr(layer, found[0][0], None) is None:
        return []
    return found


def _own_param_name(layer, param_name):
    """compressed-tensors names block scales weight_scale: the layer's are weight_scale_inv."""
    config = layer.quant_config
    if param_name.endswith("weight_scale") and config is not None \
            and config.weight_scale == "block":
        return param_name + "_inv"
    return param_name


# --- weight_loader ------------------------------------------------------------------


def load_expert_weight(layer, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                       weight_name: str, shard_id: str, expert_id: int | None) -> bool:
    """Copies this rank's part of ``loaded_weight`` into ``param`` of ``layer``;
    False when expert ``expert_id`` (physical, global) is on another rank.

    With ``expert_id`` None, ``loaded_weight`` holds every logical expert (a
    leading [E] dimension) and fills all local experts, replicas included.
    A float weight of an FP8 layer is quantized first, one expert at a time,
    and its scale loaded with it.
    """
    role = _role(layer, param)
    _check_shard_id(role, shard_id)
    kind = weight_name.rsplit(".", 1)[-1]
    if kind in _CHECKED_ONLY:
        _check_int4_metadata(layer, kind, loaded_weight, weight_name, shard_id)
        return expert_id is None or _local_slot(layer, expert_id) is not None
    if kind in INT4_NAMES and layer.quant_config is not None and layer.quant_config.packed4:
        loaded_weight = int4_checkpoint_tensor(kind, loaded_weight, layer.quant_config.packing)
    if loaded_weight.dtype == torch.float8_e8m0fnu:  # the bytes, not their values
        loaded_weight = loaded_weight.view(torch.uint8)
    _check_dtype(layer, role, loaded_weight, weight_name)
    full = _full_layout(layer, role, loaded_weight, weight_name, shard_id, expert_id)
    if role == "w2_bias" and layer.tp_rank != 0:
        # Stays zero: the TP ranks' outputs are summed, the bias is added by rank 0 only.
        return expert_id is None or _local_slot(layer, expert_id) is not None
    online = role in _WEIGHTS and layer.quant_config is not None and \
        full.dtype not in (FP8_DTYPE, torch.uint8)
    copy = _quantize_and_copy if online else _copy_into
    if expert_id is None:
        # Slot by slot from views of the checkpoint tensor: no gathered copy
        # of every local expert on the way.
        for slot, logical in enumerate(layer.local_logical_experts.tolist()):
            copy(layer, role, slot, full[logical:logical + 1], shard_id)
        return True
    slot = _local_slot(layer, expert_id)
    if slot is None:
        return False
    copy(layer, role, slot, full.unsqueeze(0), shard_id)
    return True


def _copy_into(layer, role, slot, full, shard_id):
    """One expert's checkpoint tensor ``full`` [1, ...] into slot ``slot`` of ``role``."""
    dst = getattr(layer, role).data[slot:slot + 1]
    if role in _SCALES:
        _copy_scale(layer, dst, full, role, shard_id)
    else:
        _copy_shard(layer, dst, full, role, shard_id)


def _quantize_and_copy(layer, role, slot, full, shard_id):
    """Online quantization: the whole checkpoint tensor of one expert, so that
    every TP rank cuts the same quantized weights and scales, then loaded as
    such (4-bit with asymmetric groups: their zero points too)."""
    q, scale, *zero = quantize_weight(full, layer.quant_config)
    _copy_into(layer, role, slot, q, shard_id)
    prefix = role[:-len("weight")]
    for scale_role, t in ((weight_scale_name(layer.quant_config, role), scale),
                          *((f"{prefix}weight_zero_point", z) for z in zero)):
        shape = _full_shape(layer, scale_role, shard_id)
        _copy_into(layer, scale_role, slot, _fit_scale(t, (1,), shape), shard_id)


def _check_int4_metadata(layer, kind, loaded, weight_name, shard_id):
    """GPTQ's g_idx must be the trivial k // group; compressed-tensors'
    weight_shape must be the projection's full [out, in]."""
    out, k = _full_shape(layer, "w2_weight" if shard_id == "w2" else "w13_weight", shard_id)
    if kind == "weight_shape":
        if loaded.tolist() != [out, k]:
            raise ValueError(f"FusedMoE.weight_loader: {weight_name} = {loaded.tolist()}, "
                             f"expected [{out}, {k}] (shard_id={shard_id!r})")
        return
    config = layer.quant_config
    if config is None or config.weight_dtype != "int4":
        raise ValueError(f"FusedMoE.weight_loader: {weight_name} is a GPTQ tensor: expected an "
                         f"int4 quant_config, got {config}")
    if loaded.numel() != k:
        raise ValueError(f"FusedMoE.weight_loader: {weight_name} has shape "
                         f"{list(loaded.shape)}, expected [{k}] (shard_id={shard_id!r})")
    check_trivial_g_idx(loaded, config.group_of(k), weight_name)


def check_packed4_tp(config, intermediate_size: int, tp_size: int) -> None:
    """4-bit weights shard w2's K (I) on group boundaries, two codes a byte:
    I / tp_size must be a multiple of the group (unless a group is a whole row,
    whose scale every shard keeps) and of 2."""
    inter = intermediate_size // tp_size
    group = config.group_size if tp_size > 1 else None
    if inter % 2 or (group is not None and inter % group):
        of = "2 (two codes a byte)" + (f" and of the group size {group}" if group else "")
        raise ValueError(f"FusedMoE: {config.weight_dtype} weights with intermediate_size="
                         f"{intermediate_size} and tp_size={tp_size}: expected intermediate_size"
                         f" / tp_size = {intermediate_size / tp_size:g} to be a multiple of {of}")


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


def _check_dtype(layer, role, loaded, weight_name):
    dtype = loaded.dtype
    config = layer.quant_config
    if role in _SCALES:
        # 4-bit weights' bytes: mxfp4's e8m0 scales, int4's zero points.
        byte = dtype == torch.uint8 and config is not None and \
            (config.weight_dtype == "mxfp4" or role.endswith("zero_point"))
        if not byte and (not dtype.is_floating_point or dtype.itemsize == 1):
            raise ValueError(f"FusedMoE.weight_loader: {weight_name} for {role} has dtype "
                             f"{dtype}, expected a float scale (float32, bfloat16, float16)"
                             + (", or e8m0 bytes (uint8)" if config is not None and
                                config.weight_dtype == "mxfp4" else ""))
    elif config is None and not dtype.is_floating_point:
        raise ValueError(f"FusedMoE.weight_loader: {weight_name} for {role} has dtype {dtype}: "
                         "a 4-bit checkpoint needs FusedMoE(quant_config=...), e.g. the "
                         "checkpoint's quantization_config")
    elif layer.quant_config is None and dtype.is_floating_point and dtype.itemsize == 1:
        raise ValueError(f"FusedMoE.weight_loader: {weight_name} for {role} has dtype {dtype}: "
                         "an fp8 checkpoint needs FusedMoE(quant_config=...), e.g. the "
                         "checkpoint's quantization_config")
    elif role in _WEIGHTS and config is not None:
        stored = torch.uint8 if config.packed4 else FP8_DTYPE
        if dtype != stored and not (dtype.is_floating_point and dtype.itemsize > 1):
            raise ValueError(f"FusedMoE.weight_loader: {weight_name} for {role} has dtype "
                             f"{dtype}, expected {stored} (with its scales) or a float dtype to "
                             "quantize")


def _full_shape(layer, role, shard_id):
    """Unsharded [out, in] (weights) or [out] (biases) of one expert's
    tensor, or the shape of the scale of that weight."""
    inter = layer.intermediate_size
    if role.startswith("w2"):
        shape = (layer.hidden_size, inter)
    else:
        gated = layer.is_act_and_mul and shard_id == "w13"
        shape = (2 * inter if gated else inter, layer.hidden_size)
    if role.endswith("bias"):
        return shape[:1]
    if role.endswith("input_scale"):
        return ()
    if role.endswith("weight_scale_inv") or \
            (role.endswith(("weight_scale", "weight_zero_point")) and layer.quant_config.packed4):
        return layer.quant_config.weight_scale_shape(1, *shape)[1:]
    if role.endswith("weight_scale"):
        if layer.quant_config.weight_scale == "channel":
            return (shape[0], 1)
        return (2,) if role.startswith("w13") and shard_id == "w13" and layer.is_act_and_mul \
            else ()
    return shape


def _fit_scale(loaded, lead, shape):
    """A scale in the layout ``lead + shape``, from any shape that differs
    from it in size-1 dimensions only ([out] for [out, 1], [1] for []); a
    fused gate/up tensor scale may be one for both halves. None if it fits not."""
    def sizes(dims):
        return [d for d in dims if d != 1]
    if sizes(loaded.shape) == sizes(lead + shape):
        return loaded.reshape(lead + shape)
    if shape == (2,) and sizes(loaded.shape) == sizes(lead):
        return loaded.reshape(lead + (1,)).expand(lead + shape)
    return None


def _full_layout(layer, role, loaded, weight_name, shard_id, expert_id):
    """``loaded`` in the layer's layout ([E,] out, in), after checking its shape."""
    whole = expert_id is None
    shape = _full_shape(layer, role, shard_id)
    lead = (layer.num_experts,) if whole else ()
    packed = role in _WEIGHTS and loaded.dtype == torch.uint8
    if packed:  # two codes a byte along K; gpt-oss's blocks [..., K/32, 16] flattened
        shape = shape[:-1] + (shape[-1] // 2,)
        if loaded.dim() == len(lead + shape) + 1:
            loaded = loaded.flatten(-2)
    expected = lead + shape
    if role in _SCALES:
        fitted = _fit_scale(loaded, lead, shape)
        if fitted is not None:
            return fitted
    elif tuple(loaded.shape) == expected and \
            not _stored_transposed(layer, weight_name, shape, whole):
        return loaded
    elif len(shape) == 2 and whole and not packed and tuple(loaded.shape) == lead + shape[::-1]:
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


# --- scales -------------------------------------------------------------------------


def _copy_scale(layer, dst, full, role, shard_id):
    """This rank's part of one expert's scale ``full`` [1, ...] into ``dst`` [1, ...]
    (4-bit weights' scales and zero points as they are, cut like the rows)."""
    if not layer.quant_config.packed4:
        full = full.float()
    if role.endswith("input_scale"):
        # w1 and w3 each bring the expert's input scale: keep the larger.
        dst.copy_(torch.maximum(dst, full.reshape(dst.shape)))
    elif role.endswith("weight_scale_inv"):
        _copy_block_scale(layer, dst, full, role, shard_id)
    elif layer.quant_config.weight_scale == "channel" or \
            (role.startswith("w13") and layer.quant_config.packed4):
        # Rows scaled like the weight's: w13's cut as its rows, w2's (hidden rows) whole.
        dst.copy_(full) if role.startswith("w2") else \
            _copy_shard(layer, dst, full, "w13_weight", shard_id)
    elif layer.quant_config.packed4:
        # w2's groups along K are cut like its K (on group boundaries: check_packed4_tp);
        # one group a row is every shard's.
        dst.copy_(full if layer.quant_config.group_size is None else _tp_slice(layer, full, 2))
    elif role.startswith("w2") or shard_id == "w13":
        dst.copy_(full.reshape(1, -1).expand(dst.shape) if dst.dim() == 2 else full)
    else:
        dst[:, _half(layer, shard_id)] = full.reshape(())


def _half(layer, shard_id):
    """Which of w13's two tensor scales w1 (gate) or w3 (up) owns."""
    return 1 if shard_id == "w3" and layer.is_act_and_mul else 0


def _copy_block_scale(layer, dst, full, role, shard_id):
    """Block scales ``full`` [1, ceil(out/bn), ceil(in/bk)] on the checkpoint's
    grid into ``dst`` on this rank's (local_block_shape): each local block
    takes the scale of the checkpoint block that holds it."""
    bn, bk = layer.quant_config.block_shape
    fine_n, fine_k = layer.block_shape
    if role.startswith("w13"):
        rows = _source_blocks(layer, "w13_weight", shard_id, 1, fine_n, bn)
        cols = torch.arange(dst.shape[2]) * fine_k // bk
    else:
        rows = torch.arange(dst.shape[1]) * fine_n // bn
        cols = _source_blocks(layer, "w2_weight", shard_id, 2, fine_k, bk)
    mine = torch.nonzero(rows >= 0).flatten()
    src = full[0].index_select(0, rows[mine].to(full.device)).index_select(1, cols.to(full.device))
    dst[0, mine.to(dst.device)] = src.to(dst.device)


def _source_blocks(layer, weight, shard_id, dim, fine, block):
    """For each local block of ``fine`` along the sharded ``dim`` of ``weight``,
    the checkpoint block (of ``block``) its elements come from, or -1 where
    this shard writes nothing: the weight's own sharding rule applied to
    element indices."""
    size = _full_shape(layer, weight, shard_id)[dim - 1]
    index_shape = [1, 1, 1]
    index_shape[dim] = size
    local_shape = [1, 1, 1]
    local_shape[dim] = getattr(layer, weight).shape[dim]
    local = torch.full(local_shape, -1, dtype=torch.long)
    _copy_shard(layer, local, torch.arange(size).view(index_shape), weight, shard_id)
    per_block = local.flatten().view(-1, fine)
    first = per_block[:, :1]
    exact = (per_block.div(block, rounding_mode="floor") == first.div(block, rounding_mode="floor"))
    if not bool(exact.all() and ((per_block < 0) == (first < 0)).all()):
        raise ValueError(f"FusedMoE.weight_loader: block scales of {weight} (shard_id="
                         f"{shard_id!r}) do not fall on this rank's blocks {layer.block_shape}: "
                         "interleaved gate/up rows (swigluoai) need the fused w13 tensor")
    return torch.where(first[:, 0] >= 0, first[:, 0].div(block, rounding_mode="floor"), -1)
