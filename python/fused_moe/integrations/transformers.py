"""The "fused_moe" experts implementation for Hugging Face transformers.

    import fused_moe.integrations.transformers  # registers "fused_moe"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="fused_moe")
    model.set_experts_implementation("fused_moe")  # or switch a loaded model

The model still routes (its own top-k, grouped top-k, biases, scaling, shared
experts); only its experts module, the one decorated with transformers'
``use_experts_implementation``, runs through ``fused_moe.fused_experts``.

Weights are used in place when the module stores them as fused_moe does
([E, 2I, H] / [E, H, I]: Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE,
DeepSeek-V3, ...). Modules that store them transposed ([E, H, 2I] /
[E, I, H]: gpt-oss) need a transposed contiguous copy: it is made on the first
forward, cached on the module, and made again only when the parameter's
storage or version changes (an in-place update, a load, a move), so it costs
one extra copy of the expert weights in memory. Forward only: fused_experts
has no backward, so do not train through it.

Supported: gated experts whose gate is transformers' default
``act(gate) * up`` over concatenated [gate; up] rows, and non-gated experts
(``up_proj``), with silu, gelu, gelu-tanh or relu2; gpt-oss's clamped SwiGLU
over interleaved rows (alpha 1.702, limit 7); optional biases. Anything
else raises NotImplementedError naming the module class and what is
unsupported.
"""

from __future__ import annotations

import torch
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


def register() -> None:
    """Make "fused_moe" a valid ``experts_implementation`` (done on import)."""
    ExpertsInterface.register(NAME, experts_forward)


def experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts module's forward on fused_experts: hidden_states [T, H],
    top_k_index [T, K] and top_k_weights [T, K] as the model's router gave them."""
    _check_supported(module)
    activation = _activation(module)
    w13, w2, b13, b2 = _weights(module)
    ids = top_k_index if top_k_index.dtype in (torch.int32, torch.int64) else top_k_index.long()
    out = fused_experts(  # views and int64 ids are read as they are
        hidden_states, w13, w2, top_k_weights.to(torch.float32), ids,
        activation=activation, is_act_and_mul=module.has_gate, w13_bias=b13, w2_bias=b2)
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


def _activation(module: torch.nn.Module) -> str:
    """fused_moe's name for what the module computes between its two projections."""
    gate = getattr(type(module), "_apply_gate", None)
    # transformers' own default gate (act(gate) * up over [gate; up]) lives in
    # its moe module; any other is the model's own formula.
    if module.has_gate and gate is not None and gate.__module__ != "transformers.integrations.moe":
        return _custom_gate(module, gate)
    act = type(getattr(module, "act_fn", None)).__name__
    if act not in _ACTIVATIONS:
        raise _unsupported(module, f"activation {act}")
    if module.has_gate and not module.is_concatenated:
        raise _unsupported(module, "interleaved gate/up rows with the default gate")
    return _ACTIVATIONS[act]


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


def _param(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter as fused_experts takes it: itself (any strides) when it is
    an [E, out, in] (or bias) tensor, else a cached transposed copy: a view of
    [E, in, out] would have an innermost stride of `out`, which the kernels
    would copy on every call."""
    param = getattr(module, name).detach()
    needs_copy = module.is_transposed and param.dim() == 3
    if not needs_copy:
        return param
    cache = module.__dict__.setdefault("_fused_moe_cache", {})
    # data_ptr catches a replaced or moved tensor, _version an in-place update.
    key = (param.data_ptr(), param._version, param.dtype, param.device)
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        copy = param.transpose(1, 2) if needs_copy else param
        cached = cache[name] = (key, copy.contiguous())
    return cached[1]


register()
