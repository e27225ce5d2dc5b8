"""The "fused_moe" experts implementation for Hugging Face transformers.

    import fused_moe.integrations.transformers  # registers "fused_moe"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="fused_moe")
    model.set_experts_implementation("fused_moe")  # or switch a loaded model

The model still routes (its own top-k, grouped top-k, biases, scaling, shared
experts); only its experts module, the one decorated with transformers'
``use_experts_implementation``, runs through ``fused_moe.fused_experts``.
This includes the ``FP8Experts`` of a FineGrainedFP8 model (``quantization_config=
FineGrainedFP8Config(...)`` or an FP8 checkpoint such as DeepSeek-V3's), which
dispatch through transformers' FP8 experts interface.

Weights are used in place when the module stores them as fused_moe does
([E, 2I, H] / [E, H, I]: Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE,
DeepSeek-V3, ...). Modules that store them transposed ([E, H, 2I] /
[E, I, H]: gpt-oss) need a transposed contiguous copy: it is made on the first
forward, cached on the module, and made again only when the parameter's
storage or version changes (an in-place update, a load, a move), so it costs
one extra copy of the expert weights in memory. Forward only: fused_experts
has no backward, so do not train through it.

FP8 experts run on fused_moe's FP8 kernels with their e4m3 weights and fp32
``*_scale_inv`` scales as they are (the block grid [E, ceil(N/bn), ceil(K/bk)]
is fused_moe's layout; ue8m0 scales get a cached fp32 copy, which is exact):
block scales with activations quantized per token per bk columns, or
without a block size (one scale per expert; gate_up_proj has one per half)
the scales as a cached copy per output row with activations quantized per
token, as transformers' own FP8 kernels quantize them. Not supported: static
activation scales (one per expert), FP4 experts, and FP8Experts' gate options
(softcap, clamped SwiGLU over concatenated rows).

Supported: gated experts whose gate is transformers' default
``act(gate) * up`` over concatenated [gate; up] rows, and non-gated experts
(``up_proj``), with silu, gelu, gelu-tanh or relu2; gpt-oss's clamped SwiGLU
over interleaved rows (alpha 1.702, limit 7); optional biases. Anything
else raises NotImplementedError naming the module class and what is
unsupported.
"""

from __future__ import annotations

import torch
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface

from ..experts import fused_experts

NAME = "fused_moe"

# transformers activation classes (by name: the set differs between versions)
# that compute exactly one of fused_moe's activations.
_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "ReLUSquaredActivation": "relu2",
}

# Custom gates (a module's own ``_apply_gate``) that fused_moe computes, by
# qualified name, with the gate/up row layout each expects.
_CUSTOM_GATES = {"GptOssExperts._apply_gate": "swigluoai"}
_SWIGLUOAI_ALPHA, _SWIGLUOAI_LIMIT = 1.702, 7.0

# FP8Experts' own gate computes transformers' default act(gate) * up unless one
# of these attributes is set.
_FP8_GATE_OPTIONS = ("gate_softcap", "up_softcap", "swiglu_alpha", "limit")
_FP8_WEIGHT_DTYPE = torch.float8_e4m3fn


def register() -> None:
    """Make "fused_moe" a valid ``experts_implementation`` (done on import),
    for bf16/fp16/fp32 experts and for FineGrainedFP8's FP8Experts."""
    ExpertsInterface.register(NAME, experts_forward)
    FP8ExpertsInterface.register(NAME, fp8_experts_forward)


def experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts module's forward on fused_experts: hidden_states [T, H],
    top_k_index [T, K] and top_k_weights [T, K] as the model's router gave them."""
    _check_supported(module)
    return _forward(module, hidden_states, top_k_index, top_k_weights)


def fp8_experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """experts_forward for transformers' FP8Experts: the same, with the fp8
    weights and their scales passed to fused_experts' FP8 path."""
    _check_supported(module)
    _check_fp8_supported(module)
    return _forward(module, hidden_states, top_k_index, top_k_weights, **_fp8_args(module))


def _forward(module, hidden_states, top_k_index, top_k_weights, **quant) -> torch.Tensor:
    activation = _activation(module)
    w13, w2, b13, b2 = _weights(module)
    ids = top_k_index if top_k_index.dtype in (torch.int32, torch.int64) else top_k_index.long()
    out = fused_experts(  # views and int64 ids are read as they are
        hidden_states, w13, w2, top_k_weights.to(torch.float32), ids,
        activation=activation, is_act_and_mul=module.has_gate, w13_bias=b13, w2_bias=b2, **quant)
    return out.to(hidden_states.dtype)


def _unsupported(module: torch.nn.Module, what: str) -> NotImplementedError:
    return NotImplementedError(
        f'experts_implementation="{NAME}" does not support {type(module).__name__}: {what}. '
        'Use experts_implementation="grouped_mm" or "eager" for this model.')


def _check_supported(module: torch.nn.Module) -> None:
    # getattr: older transformers have neither attribute.
    if getattr(module, "has_post_expert_norm", False):
        raise _unsupported(module, "a norm after each expert (has_post_expert_norm)")
    if getattr(module, "_is_expert_parallel", False):
        raise _unsupported(module, "expert parallelism (ids of experts on other ranks)")


def _check_fp8_supported(module: torch.nn.Module) -> None:
    options = [name for name in _FP8_GATE_OPTIONS if getattr(module, name, None) is not None]
    if options:
        raise _unsupported(module, f"FP8 experts with the gate options {', '.join(options)}")
    if module.activation_scheme != "dynamic":
        raise _unsupported(module, f"{module.activation_scheme} activation scales (one per expert)")
    dtype = module.down_proj.dtype
    if dtype.itemsize == 1 and dtype != _FP8_WEIGHT_DTYPE:
        raise _unsupported(module, f"expert weights in {dtype} (FP4 experts)")


def _activation(module: torch.nn.Module) -> str:
    """fused_moe's name for what the module computes between its two projections."""
    gate = getattr(type(module), "_apply_gate", None)
    if module.has_gate and gate is not None and not _is_default_gate(gate):
        return _custom_gate(module, gate)
    act = type(getattr(module, "act_fn", None)).__name__
    if act not in _ACTIVATIONS:
        raise _unsupported(module, f"activation {act}")
    if module.has_gate and not module.is_concatenated:
        raise _unsupported(module, "interleaved gate/up rows with the default gate")
    return _ACTIVATIONS[act]


def _is_default_gate(gate) -> bool:
    # transformers' own default gate (act(gate) * up over [gate; up]) lives in
    # its moe module; FP8Experts' gate is the same formula once
    # _check_fp8_supported has refused its options; any other is the model's own.
    return (gate.__module__ == "transformers.integrations.moe"
            or gate.__qualname__ == "FP8Experts._apply_gate")


def _custom_gate(module: torch.nn.Module, gate) -> str:
    name = _CUSTOM_GATES.get(gate.__qualname__)
    if name is None:
        raise _unsupported(module, f"its own gate function {gate.__qualname__}")
    if module.is_concatenated:
        raise _unsupported(module, f"{name} over concatenated gate/up rows (fused_moe wants them interleaved)")
    if (module.alpha, module.limit) != (_SWIGLUOAI_ALPHA, _SWIGLUOAI_LIMIT):
        raise _unsupported(module, f"{name} with alpha={module.alpha}, limit={module.limit} "
                                   f"(fused_moe has alpha={_SWIGLUOAI_ALPHA}, limit={_SWIGLUOAI_LIMIT})")
    return name


def _weights(module: torch.nn.Module):
    """(w13 [E, 2I or I, H], w2 [E, H, I], w13_bias, w2_bias) in fused_moe's layout."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    w13 = _param(module, up)
    w2 = _param(module, "down_proj")
    b13 = _param(module, up + "_bias") if module.has_bias else None
    b2 = _param(module, "down_proj_bias") if module.has_bias else None
    return w13, w2, b13, b2


def _fp8_args(module: torch.nn.Module) -> dict:
    """fused_experts' FP8 arguments for an FP8Experts module; none when its
    weights are not fp8 (FP8Experts then multiplies them as they are)."""
    if module.down_proj.dtype != _FP8_WEIGHT_DTYPE:
        return {}
    up = "gate_up_proj" if module.has_gate else "up_proj"
    if module.block_size is None:
        # Per-tensor scales; transformers' kernels then quantize activations per token.
        return dict(w13_scale=_channel_scale(module, up), w2_scale=_channel_scale(module, "down_proj"),
                    per_act_token_quant=True)
    block = tuple(module.block_size)
    return dict(w13_scale=_block_scale(module, up, block), w2_scale=_block_scale(module, "down_proj", block),
                block_shape=block)


def _block_scale(module: torch.nn.Module, name: str, block: tuple[int, int]) -> torch.Tensor:
    """The [E, ceil(N/bn), ceil(K/bk)] scales of weight `name`, fp32: as they
    are, or for ue8m0 (power-of-two) scales a cached fp32 copy, which is exact."""
    experts, rows, cols = getattr(module, name).shape
    scale = getattr(module, name + "_scale_inv").detach()
    grid = (experts, -(-rows // block[0]), -(-cols // block[1]))
    # FP8Experts keeps two scale rows for gate_up_proj when 2I < bn (one per
    # half): no block grid of fused_moe's.
    if tuple(scale.shape) != grid:
        raise _unsupported(module, f"{name}_scale_inv of shape {tuple(scale.shape)} for {block} blocks "
                                   f"of a {(experts, rows, cols)} weight (fused_moe wants {grid})")
    if scale.dtype == torch.float32:
        return scale
    return _cached(module, name + "_scale_inv", scale, lambda s: s.to(torch.float32))


def _channel_scale(module: torch.nn.Module, name: str) -> torch.Tensor:
    """Per-tensor scales of weight `name` ([E, 1, 1], or [E, 2, 1] for
    gate_up_proj: one per half) as fp32 scales per output row [E, N], which
    fused_moe applies exactly; a cached copy of E * N floats."""
    rows = getattr(module, name).shape[1]
    scale = getattr(module, name + "_scale_inv").detach()
    if scale.dim() != 3 or scale.shape[2] != 1 or rows % scale.shape[1]:
        raise _unsupported(module, f"{name}_scale_inv of shape {tuple(scale.shape)} without a block size")
    return _cached(module, name + "_scale_inv", scale,
                   lambda s: s.to(torch.float32).repeat_interleave(rows // s.shape[1], dim=1)[..., 0].contiguous())


def _param(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter as fused_experts takes it: itself (any strides) when it is
    an [E, out, in] (or bias) tensor, else a cached transposed copy: a view of
    [E, in, out] would have an innermost stride of `out`, which the kernels
    would copy on every call."""
    param = getattr(module, name).detach()
    if not (module.is_transposed and param.dim() == 3):
        return param
    return _cached(module, name, param, lambda p: p.transpose(1, 2).contiguous())


def _cached(module: torch.nn.Module, name: str, param: torch.Tensor, make) -> torch.Tensor:
    """make(param), kept on the module and made again only when param changes."""
    cache = module.__dict__.setdefault("_fused_moe_cache", {})
    # data_ptr catches a replaced or moved tensor, _version an in-place update.
    key = (param.data_ptr(), param._version, param.dtype, param.device)
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        cached = cache[name] = (key, make(param))
    return cached[1]


register()
