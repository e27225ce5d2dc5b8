"""Quantization schemes of the experts: what a quantized layer stores, and what
its kernels are given.

A scheme is a :class:`QuantConfig`. FP8 (e4m3fn) weights carry fp32 scales,
``w = q * scale``, at one of three granularities:

========  ============================================  =========================
scheme    weight scale of w [E, N, K]                   activations
========  ============================================  =========================
block     [E, ceil(N / bn), ceil(K / bk)] (bn, bk)      dynamic, per token per bk
channel   [E, N]                                        dynamic per token, or static
tensor    [E]                                           static, or dynamic per tensor
========  ============================================  =========================

Every scale is ``max(amax, SCALE_EPS) / FP8_MAX`` of the values it covers and
``q = saturate(x / scale)``, for weights (quantize_weight) and activations
(the ``quantize_fp8`` op) alike.

:meth:`QuantConfig.from_checkpoint` reads the ``quantization_config`` of a
checkpoint's config.json: ``fp8`` (DeepSeek-V3/R1, Qwen3-FP8, AutoFP8),
``compressed-tensors`` (float 8-bit weights), ``fbgemm_fp8`` and ModelOpt FP8.
"""

from __future__ import annotations

import dataclasses
import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_EPS = 1e-10  # the amax floor: an all-zero block gets a tiny scale, not 0
WEIGHT_SCALES = ("block", "channel", "tensor")
ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An FP8 scheme, named after vLLM's ``FusedMoEQuantConfig``.

    weight_scale: "block" (block_shape = (bn, bk)), "channel" or "tensor".
    activation_scheme: "dynamic" (scales computed per call) or "static"
    (``a13_scale`` / ``a2_scale`` loaded from the checkpoint, tensor scheme).
    per_act_token_quant: dynamic activations get one scale per token
    (channel scheme) rather than one per tensor. Block scales quantize
    activations per token per bk columns whatever this says.
    """

    weight_scale: str = "block"
    block_shape: tuple[int, int] | None = (128, 128)
    activation_scheme: str = "dynamic"
    per_act_token_quant: bool = False

    def __post_init__(self):
        if self.weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"QuantConfig: weight_scale must be one of {WEIGHT_SCALES}, "
                             f"got {self.weight_scale!r}")
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"QuantConfig: activation_scheme must be one of "
                             f"{ACTIVATION_SCHEMES}, got {self.activation_scheme!r}")
        if self.weight_scale == "block":
            shape = self.block_shape
            if shape is None or len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"QuantConfig: block scales need block_shape (bn, bk) of "
                                 f"positive ints, got {shape!r}")
            object.__setattr__(self, "block_shape", (int(shape[0]), int(shape[1])))
            if self.activation_scheme != "dynamic":
                raise ValueError("QuantConfig: block scales quantize activations dynamically; "
                                 "got activation_scheme='static'")
        elif self.block_shape is not None:
            object.__setattr__(self, "block_shape", None)

    @classmethod
    def fp8_block(cls, block_shape=(128, 128)) -> QuantConfig:
        return cls("block", tuple(block_shape))

    @classmethod
    def fp8_channel(cls, activation_scheme="dynamic") -> QuantConfig:
        return cls("channel", None, activation_scheme, activation_scheme == "dynamic")

    @classmethod
    def fp8_tensor(cls, activation_scheme="static") -> QuantConfig:
        return cls("tensor", None, activation_scheme, False)

    @classmethod
    def from_checkpoint(cls, quantization_config: dict) -> QuantConfig:
        """The scheme of a checkpoint's ``quantization_config`` (config.json).

        Raises NotImplementedError for a method or format that is known but
        not supported (mxfp4, gptq, awq, e5m2, ...), ValueError for a config
        that is not one."""
        if not isinstance(quantization_config, dict):
            raise ValueError(f"quantization_config must be a dict, got "
                             f"{type(quantization_config).__name__}")
        method = quantization_config.get("quant_method")
        parse = _CHECKPOINT_METHODS.get(method)
        if parse is None:
            raise NotImplementedError(f"quantization_config: quant_method={method!r} is not "
                                      f"supported yet (supported: {sorted(_CHECKPOINT_METHODS)})")
        return parse(quantization_config)

    @property
    def static_activations(self) -> bool:
        return self.activation_scheme == "static"

    def kernel_kwargs(self) -> dict:
        """The scheme's keyword arguments of fused_experts (scales apart)."""
        return {"block_shape": self.block_shape, "per_act_token_quant": self.per_act_token_quant}

    def weight_scale_shape(self, num_experts: int, n: int, k: int) -> tuple[int, ...]:
        """The fp32 scale tensor's shape for weights [num_experts, n, k]."""
        if self.weight_scale == "block":
            bn, bk = self.block_shape
            return (num_experts, math.ceil(n / bn), math.ceil(k / bk))
        if self.weight_scale == "channel":
            return (num_experts, n)
        return (num_experts,)


# Names accepted for quant_config= where a QuantConfig is expected.
_NAMED = {
    "fp8": QuantConfig.fp8_block,
    "fp8-block": QuantConfig.fp8_block,
    "fp8-channel": QuantConfig.fp8_channel,
    "fp8-tensor": lambda: QuantConfig.fp8_tensor("dynamic"),
}


def as_quant_config(spec) -> QuantConfig | None:
    """None, a QuantConfig, one of the names "fp8" (= "fp8-block"),
    "fp8-block", "fp8-channel", "fp8-tensor" (dynamic activations), or a
    checkpoint's ``quantization_config`` dict (QuantConfig.from_checkpoint)."""
    if spec is None or isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, str) and spec in _NAMED:
        return _NAMED[spec]()
    if isinstance(spec, dict):
        return QuantConfig.from_checkpoint(spec)
    raise ValueError(f"quant_config must be None, a QuantConfig, a checkpoint's "
                     f"quantization_config dict or one of {sorted(_NAMED)}, got {spec!r}")


# --- checkpoint quantization configs ------------------------------------------------


def _fp8_config(config: dict) -> QuantConfig:
    """``quant_method: fp8``: block scales with ``weight_block_size`` [bn, bk]
    (DeepSeek-V3/R1, Qwen3-FP8; dynamic activations), else one scale per
    tensor with ``activation_scheme`` static (AutoFP8) or dynamic."""
    _check_fp8_format(config.get("fmt", "e4m3"), "fmt")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(f"quantization_config: activation_scheme={scheme!r}, expected one of "
                         f"{ACTIVATION_SCHEMES}")
    block = config.get("weight_block_size")
    if block is None:
        return QuantConfig.fp8_tensor(scheme)
    if scheme != "dynamic":
        raise ValueError(f"quantization_config: weight_block_size={block} with "
                         f"activation_scheme={scheme!r}, expected 'dynamic' (block scales "
                         "quantize activations per token per block)")
    return QuantConfig.fp8_block(_block_shape(block, "weight_block_size"))


def _compressed_tensors_config(config: dict) -> QuantConfig:
    """``quant_method: compressed-tensors`` with float 8-bit weights: weight
    ``strategy`` channel, tensor or block (``block_structure``);
    ``input_activations`` dynamic (per ``token`` or per ``tensor``; per group
    with block weights) or static (per tensor)."""
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config: compressed-tensors needs config_groups, got "
                         f"{groups!r}")
    schemes = {_compressed_tensors_group(name, group) for name, group in groups.items()}
    if len(schemes) > 1:
        raise NotImplementedError(f"quantization_config: config_groups {sorted(groups)} give "
                                  f"different schemes {sorted(map(str, schemes))}: one scheme "
                                  "for every layer is supported yet")
    return schemes.pop()


def _compressed_tensors_group(name: str, group: dict) -> QuantConfig:
    weights = group.get("weights") or {}
    kind, bits = weights.get("type"), weights.get("num_bits")
    if (kind, bits) != ("float", 8):
        raise NotImplementedError(f"quantization_config: config_groups.{name}.weights type="
                                  f"{kind!r} num_bits={bits!r} is not supported yet (expected "
                                  "type='float', num_bits=8: FP8)")
    strategy = weights.get("strategy")
    activations = group.get("input_activations")
    if activations is None:
        raise NotImplementedError(f"quantization_config: config_groups.{name} has no "
                                  "input_activations: weight-only FP8 is not supported yet")
    dynamic = bool(activations.get("dynamic"))
    act_strategy = activations.get("strategy")
    where = f"config_groups.{name}"
    if strategy == "block":
        shape = _block_shape(weights.get("block_structure"), f"{where}.weights.block_structure")
        if not dynamic:
            raise ValueError(f"quantization_config: {where} block weights with static "
                             "input_activations, expected dynamic ones")
        return QuantConfig.fp8_block(shape)
    if strategy not in ("channel", "tensor"):
        raise NotImplementedError(f"quantization_config: {where}.weights strategy="
                                  f"{strategy!r} is not supported yet (expected channel, "
                                  "tensor or block)")
    expected = ("token", "tensor") if dynamic else ("tensor",)
    if act_strategy not in expected:
        raise ValueError(f"quantization_config: {where}.input_activations strategy="
                         f"{act_strategy!r} with dynamic={dynamic}, expected one of {expected}")
    return QuantConfig(strategy, None, "dynamic" if dynamic else "static",
                       act_strategy == "token")


def _fbgemm_fp8_config(config: dict) -> QuantConfig:
    """``quant_method: fbgemm_fp8``: per-channel weights, activations per
    token. Its ``activation_scale_ub`` (an upper bound on activation amax)
    is not applied: activations take their own amax."""
    return QuantConfig.fp8_channel("dynamic")


def _modelopt_config(config: dict) -> QuantConfig:
    """``quant_method: modelopt`` with ``quant_algo: FP8``: per-tensor
    weights and static per-tensor activations."""
    algo = config.get("quant_algo")
    if algo != "FP8":
        raise NotImplementedError(f"quantization_config: modelopt quant_algo={algo!r} is not "
                                  "supported yet (expected 'FP8')")
    return QuantConfig.fp8_tensor("static")


_CHECKPOINT_METHODS = {
    "fp8": _fp8_config,
    "compressed-tensors": _compressed_tensors_config,
    "fbgemm_fp8": _fbgemm_fp8_config,
    "modelopt": _modelopt_config,
}


def _check_fp8_format(fmt, key):
    if fmt != "e4m3":
        raise NotImplementedError(f"quantization_config: {key}={fmt!r}: only the e4m3 FP8 "
                                  "format (float8_e4m3fn) is supported")


def _block_shape(block, key):
    if not isinstance(block, (list, tuple)) or len(block) != 2 \
            or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config: {key}={block!r}, expected [bn, bk] of positive "
                         "ints")
    return tuple(block)


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The scale of values whose largest magnitude is amax: max(amax, SCALE_EPS) / FP8_MAX."""
    return amax.float().clamp(min=SCALE_EPS) / FP8_MAX


def _saturate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [E, N, K] (any float dtype) -> (fp8 [E, N, K], fp32 scales of
    config.weight_scale_shape). Partial last blocks take the amax of what they
    hold. One expert at a time, so the float temporaries stay one expert's size."""
    if w.dim() != 3:
        raise ValueError(f"quantize_weight: w must be [E, N, K], got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(config.weight_scale_shape(*w.shape), dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        q[e], scale[e] = _quantize_expert(w[e].float(), config)
    return q, scale


def _quantize_expert(x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = x.shape
    if config.weight_scale == "tensor":
        scale = scale_of(x.abs().amax())
        return _saturate(x, scale), scale
    if config.weight_scale == "channel":
        scale = scale_of(x.abs().amax(dim=1))
        return _saturate(x, scale[:, None]), scale
    bn, bk = config.block_shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.nn.functional.pad(x.abs(), (0, kb * bk - k, 0, nb * bn - n))
    scale = scale_of(padded.view(nb, bn, kb, bk).amax(dim=(1, 3)))
    full = scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return _saturate(x, full), scale


def expand_weight_scale(scale: torch.Tensor, shape, block_shape=None) -> torch.Tensor:
    """A weight scale broadcast to every element of weights of ``shape`` [E, N, K]."""
    e, n, k = shape
    s = scale.float()
    if block_shape is not None:
        bn, bk = block_shape
        return s.repeat_interleave(bn, dim=1)[:, :n].repeat_interleave(bk, dim=2)[:, :, :k]
    if s.dim() >= 2 and s.shape[1] == n and n != 1:
        return s.reshape(e, n, 1).expand(e, n, k)
    return s.reshape(e, 1, 1).expand(e, n, k)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block_shape=None,
                      dtype=torch.float32) -> torch.Tensor:
    """fp8 weights [E, N, K] and their scales (block when block_shape is given,
    else channel [E, N] or tensor [E]) -> weights in ``dtype``."""
    return (q.float() * expand_weight_scale(scale, q.shape, block_shape)).to(dtype)
