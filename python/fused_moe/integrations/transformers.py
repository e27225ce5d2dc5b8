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

MXFP4 gpt-oss (``Mxfp4Config``). transformers' ``Mxfp4GptOssExperts`` is not
decorated with ``use_experts_implementation``: ``Mxfp4GptOssMLP`` calls the
triton kernels hub (``kernels-community/gpt-oss-triton-kernels``) directly, and
``experts_implementation`` does nothing for it. So importing this module
patches, and only when the model's experts implementation is "fused_moe":
``Mxfp4GptOssExperts.__init__`` keeps its ``config`` (as the decorator does);
``Mxfp4GptOssExperts.forward`` runs fused_experts; ``Mxfp4GptOssMLP.forward``
routes with the model's router (as it does under expert parallelism) and calls
the experts module instead of the hub's routing. Any other implementation runs
transformers' code unchanged. The experts then run on the packed e2m1 bytes as
they are: ``gate_up_proj`` [E, 2I, H/2] uint8 (gpt-oss's ``*_blocks``
[E, 2I, H/32, 16] flattened: interleaved gate/up rows, the even k in the low
nibble, fused_moe's own layout) with its e8m0 uint8 scales [E, 2I, H/32], the
same for ``down_proj``, no dequantized copy. The scales are taken from
``{proj}_precision_config.weight_scale`` (the hub's tensor) or from a
``{proj}_scales`` tensor on the module; the weights from the hub's tensor or
the module's uint8 ``{proj}`` (or a ``{proj}_blocks`` tensor). Hub tensors in
its plain ``StridedLayout`` are read in place; hub layouts swizzled for a GPU
(Hopper, Blackwell, CDNA4 value/scale layouts) are unswizzled once into a
cached packed copy (4-bit, a quarter of bf16). The fp32 biases get a cached
copy in the activations' dtype (E * (2I + H) values). Refused by name:
``swiglu_limit`` other than 7, expert parallelism (``_is_hooked``).

How transformers 5 loads an MXFP4 checkpoint matters here: the
``Mxfp4GptOssExperts`` modules exist only when the kernels hub and
``accelerate`` are available (and, on CPU, triton >= 3.5). Without
``accelerate``, ``Mxfp4Config(dequantize=False)`` raises ImportError; without
triton or the ``kernels`` package, or on a device transformers does not take
for MXFP4 (among them a CPU-only machine with a CUDA build of torch: its
current accelerator reads "cuda" with no GPU), it falls back to
``dequantize=True`` with a warning, and if the hub cannot be fetched,
loading fails. Dequantized, the experts are bf16 ``GptOssExperts``
(``Mxfp4Dequantize`` at load), which run on fused_moe's bf16 path above.
"""

from __future__ import annotations

import functools

import torch
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface

try:  # transformers' MXFP4 (gpt-oss) experts; absent in older versions
    from transformers.integrations import mxfp4 as _hf_mxfp4
except ImportError:  # pragma: no cover
    _hf_mxfp4 = None

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
    _patch_mxfp4()


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


# ---------------------------------------------------------------------------
# MXFP4 gpt-oss experts (transformers' Mxfp4GptOssExperts / Mxfp4GptOssMLP)

_MXFP4_WEIGHTS = ("gate_up_proj", "down_proj")


def mxfp4_experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """An Mxfp4GptOssExperts module's forward on fused_experts' mxfp4 path:
    the packed e2m1 weights and e8m0 scales as the module holds them,
    gpt-oss's biases, clamped SwiGLU (swigluoai) over interleaved rows."""
    _check_mxfp4_supported(module)
    w13, w13_scale = _mxfp4_weight(module, "gate_up_proj", 2 * module.intermediate_size, module.hidden_size)
    w2, w2_scale = _mxfp4_weight(module, "down_proj", module.hidden_size, module.intermediate_size)
    dtype = hidden_states.dtype
    b13 = _cached(module, "gate_up_proj_bias", module.gate_up_proj_bias.detach(), lambda b: b.to(dtype))
    b2 = _cached(module, "down_proj_bias", module.down_proj_bias.detach(), lambda b: b.to(dtype))
    ids = top_k_index if top_k_index.dtype in (torch.int32, torch.int64) else top_k_index.long()
    out = fused_experts(
        hidden_states, w13, w2, top_k_weights.to(torch.float32), ids,
        activation="swigluoai", w13_bias=b13, w2_bias=b2, w13_scale=w13_scale, w2_scale=w2_scale)
    return out.to(dtype)


def _check_mxfp4_supported(module: torch.nn.Module) -> None:
    if getattr(module, "_is_hooked", False):
        raise _unsupported(module, "expert parallelism (ids of experts on other ranks)")
    if (module.alpha, module.limit) != (_SWIGLUOAI_ALPHA, _SWIGLUOAI_LIMIT):
        raise _unsupported(module, f"swigluoai with alpha={module.alpha}, limit={module.limit} "
                                   f"(fused_moe has alpha={_SWIGLUOAI_ALPHA}, limit={_SWIGLUOAI_LIMIT})")


def _mxfp4_weight(module: torch.nn.Module, proj: str, rows: int, cols: int):
    """(packed uint8 [E, rows, cols/2], e8m0 uint8 scales [E, rows, cols/32])
    of weight `proj`, views of what the module holds where it can be."""
    experts = module.num_experts
    weight = getattr(module, proj + "_blocks", None)
    if weight is None:
        weight = getattr(module, proj, None)
    precision = getattr(module, proj + "_precision_config", None)
    scale = getattr(module, proj + "_scales", None)
    if scale is None and precision is not None:
        scale = precision.weight_scale
    if weight is None or scale is None:
        raise _unsupported(module, f"{proj} without its MXFP4 scales ({proj}_scales or "
                                   f"{proj}_precision_config.weight_scale)")
    weight = _from_hub(module, proj, weight)
    scale = _from_hub(module, proj + "_scales", scale)
    if scale.dtype != torch.uint8:  # float8_e8m0fnu: the same bytes
        scale = scale.view(torch.uint8) if scale.dtype.itemsize == 1 else scale
    weight = weight.reshape(experts, rows, -1) if weight.dim() == 4 else weight
    want_w, want_s = (experts, rows, cols // 2), (experts, rows, cols // 32)
    if weight.dtype != torch.uint8 or tuple(weight.shape) != want_w:
        raise _unsupported(module, f"MXFP4 {proj} of {weight.dtype} {tuple(weight.shape)} "
                                   f"(fused_moe wants uint8 {want_w})")
    if scale.dtype != torch.uint8 or tuple(scale.shape) != want_s:
        raise _unsupported(module, f"MXFP4 {proj} scales of {scale.dtype} {tuple(scale.shape)} "
                                   f"(fused_moe wants e8m0 uint8 {want_s})")
    if weight.stride(-1) != 1:
        weight = _cached(module, proj + ".contiguous", weight, lambda w: w.contiguous())
    return weight, scale


def _from_hub(module: torch.nn.Module, name: str, tensor):
    """A plain tensor as it is; a triton kernels hub tensor (``.storage.data``
    laid out by ``.storage.layout``, stored [E, K, N]) as the [E, N, K] torch
    tensor it holds: a view for the hub's StridedLayout, else a cached
    unswizzled copy (as transformers' Mxfp4ReverseDeserialize unswizzles)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach()
    storage = getattr(tensor, "storage", None)
    if storage is None or not hasattr(storage, "layout"):
        raise _unsupported(module, f"{name} of type {type(tensor).__name__}")
    data, layout = storage.data, storage.layout
    if type(layout).__name__ == "StridedLayout":
        return layout.unswizzle_data(data).transpose(-1, -2)
    return _cached(module, name + ".unswizzled", data,
                   lambda d: layout.unswizzle_data(d).transpose(-1, -2).contiguous())


def _mxfp4_uses_fused_moe(module: torch.nn.Module) -> bool:
    config = module.__dict__.get("config")
    return getattr(config, "_experts_implementation", None) == NAME


def _patch_mxfp4() -> None:
    """Route Mxfp4GptOssExperts to fused_moe when the model asks for it (see
    the module docstring: transformers has no hook for these modules)."""
    if _hf_mxfp4 is None or getattr(_hf_mxfp4.Mxfp4GptOssExperts, "_fused_moe_patched", False):
        return
    experts_cls, mlp_cls = _hf_mxfp4.Mxfp4GptOssExperts, _hf_mxfp4.Mxfp4GptOssMLP
    init, forward, mlp_forward = experts_cls.__init__, experts_cls.forward, mlp_cls.forward

    @functools.wraps(init)
    def __init__(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        self.config = config

    @functools.wraps(forward)
    def experts_forward_(self, hidden_states, top_k_index, top_k_weights):
        if _mxfp4_uses_fused_moe(self):
            return mxfp4_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return forward(self, hidden_states, top_k_index, top_k_weights)

    @functools.wraps(mlp_forward)
    def mlp_forward_(self, hidden_states):
        if not _mxfp4_uses_fused_moe(self.experts):
            return mlp_forward(self, hidden_states)
        batch_size = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(-1, self.router.hidden_dim)
        router_logits, router_scores, router_indices = self.router(hidden_states)
        routed_out = self.experts(hidden_states, router_indices, router_scores)
        return routed_out.reshape(batch_size, -1, self.router.hidden_dim), router_logits

    experts_cls.__init__, experts_cls.forward, mlp_cls.forward = __init__, experts_forward_, mlp_forward_
    experts_cls._fused_moe_patched = True


register()
