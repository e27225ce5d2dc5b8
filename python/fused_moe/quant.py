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

4-bit weights are weight-only (activations stay bf16/fp16/fp32): packed two
codes a byte along K (uint8 [E, N, K/2], the even k in the low nibble), one
scale per ``group_size`` columns of a row ([E, N, K/group]):

=======  ======================================  ===============================
scheme   scales                                  value of code c
=======  ======================================  ===============================
mxfp4    uint8 e8m0 exponents s, group 32        e2m1(c) * 2^(s - 127)
int4     bf16/fp16/fp32 s (+ uint8 zero points)  (c - zero) * s, zero 8 if none
=======  ======================================  ===============================

mxfp4 (gpt-oss, OCP MX) checkpoints come from ``quant_method: mxfp4``; int4
from ``gptq``, ``awq`` and compressed-tensors ``pack-quantized``.
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
WEIGHT_DTYPES = ("fp8", "mxfp4", "int4")
MXFP4_GROUP = 32
E8M0_DTYPES = (torch.uint8, torch.float8_e8m0fnu)
INT4_PACKINGS = (None, "gptq", "gptq_v2", "awq", "pack-quantized")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An FP8 scheme, named after vLLM's ``FusedMoEQuantConfig``.

    weight_scale: "block" (block_shape = (bn, bk)), "channel" or "tensor".
    activation_scheme: "dynamic" (scales computed per call) or "static"
    (``a13_scale`` / ``a2_scale`` loaded from the checkpoint, tensor scheme).
    per_act_token_quant: dynamic activations get one scale per token
    (channel scheme) rather than one per tensor. Block scales quantize
    activations per token per bk columns whatever this says.

    weight_dtype "mxfp4" or "int4": 4-bit weight-only (``QuantConfig.mxfp4()``,
    ``QuantConfig.int4(group_size, symmetric)``): weight_scale "group",
    activation_scheme "none", ``group_size`` columns a scale (None: a whole
    row), ``zero_point`` for asymmetric int4. ``packing``: how the checkpoint
    packs int4 tensors ("gptq", "gptq_v2", "awq", "pack-quantized"; None for
    a config not read from a checkpoint); it tells GPTQ's qzeros from AWQ's
    (same shape, other order) and takes no part in comparisons.
    """

    weight_scale: str = "block"
    block_shape: tuple[int, int] | None = (128, 128)
    activation_scheme: str = "dynamic"
    per_act_token_quant: bool = False
    weight_dtype: str = "fp8"
    group_size: int | None = None
    zero_point: bool = False
    packing: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"QuantConfig: weight_dtype must be one of {WEIGHT_DTYPES}, got "
                             f"{self.weight_dtype!r}")
        if self.packed4:
            self._check_packed4()
            return
        if self.group_size is not None or self.zero_point:
            raise ValueError("QuantConfig: group_size and zero_point are for 4-bit weights; got "
                             f"weight_dtype={self.weight_dtype!r}")
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

    def _check_packed4(self):
        expected = ("group", None, "none", False)
        got = (self.weight_scale, self.block_shape, self.activation_scheme,
               self.per_act_token_quant)
        if got != expected:
            raise ValueError(f"QuantConfig: {self.weight_dtype} weights are weight-only with group "
                             "scales: expected (weight_scale, block_shape, activation_scheme, "
                             f"per_act_token_quant) = {expected}, got {got}")
        g = self.group_size
        if self.weight_dtype == "mxfp4" and (g != MXFP4_GROUP or self.zero_point):
            raise ValueError(f"QuantConfig: mxfp4 has group_size {MXFP4_GROUP} and no zero "
                             f"points, got group_size={g!r}, zero_point={self.zero_point}")
        if g is not None and (not isinstance(g, int) or g < 2 or g % 2):
            raise ValueError(f"QuantConfig: int4 group_size must be a positive even int or None "
                             f"(a whole row), got {g!r}")
        if self.packing not in INT4_PACKINGS:
            raise ValueError(f"QuantConfig: packing must be one of {INT4_PACKINGS}, got "
                             f"{self.packing!r}")

    @classmethod
    def mxfp4(cls) -> QuantConfig:
        return cls("group", None, "none", False, "mxfp4", MXFP4_GROUP)

    @classmethod
    def int4(cls, group_size: int | None = 128, symmetric: bool = True) -> QuantConfig:
        return cls("group", None, "none", False, "int4", group_size, not symmetric)

    @property
    def packed4(self) -> bool:
        """4-bit weights, two a byte (mxfp4 or int4)."""
        return self.weight_dtype in ("mxfp4", "int4")

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
        not supported (gptq with desc_act, e5m2, ...), ValueError for a config
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
        if self.packed4:
            return {}
        return {"block_shape": self.block_shape, "per_act_token_quant": self.per_act_token_quant}

    def weight_scale_shape(self, num_experts: int, n: int, k: int) -> tuple[int, ...]:
        """The scale tensor's shape for weights [num_experts, n, k] (k unpacked
        for 4-bit weights)."""
        if self.packed4:
            return (num_experts, n, k // self.group_of(k))
        if self.weight_scale == "block":
            bn, bk = self.block_shape
            return (num_experts, math.ceil(n / bn), math.ceil(k / bk))
        if self.weight_scale == "channel":
            return (num_experts, n)
        return (num_experts,)

    def group_of(self, k: int) -> int:
        """Columns a scale for 4-bit weights of k columns; k must be a multiple."""
        group = self.group_size or k
        if k % group:
            raise ValueError(f"QuantConfig: K={k} is not a multiple of the {self.weight_dtype} "
                             f"group size {group}")
        return group


# Names accepted for quant_config= where a QuantConfig is expected.
_NAMED = {
    "fp8": QuantConfig.fp8_block,
    "fp8-block": QuantConfig.fp8_block,
    "fp8-channel": QuantConfig.fp8_channel,
    "fp8-tensor": lambda: QuantConfig.fp8_tensor("dynamic"),
    "mxfp4": QuantConfig.mxfp4,
    "int4-g32": lambda: QuantConfig.int4(32),
    "int4-g64": lambda: QuantConfig.int4(64),
    "int4-g128": lambda: QuantConfig.int4(128),
    "int4-g128-asym": lambda: QuantConfig.int4(128, symmetric=False),
}


def as_quant_config(spec) -> QuantConfig | None:
    """None, a QuantConfig, one of the names "fp8" (= "fp8-block"),
    "fp8-block", "fp8-channel", "fp8-tensor" (dynamic activations), "mxfp4",
    "int4-g32", "int4-g64", "int4-g128", "int4-g128-asym", or a checkpoint's
    ``quantization_config`` dict (QuantConfig.from_checkpoint)."""
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
    fmt = config.get("format")
    schemes = {_compressed_tensors_group(name, group, fmt) for name, group in groups.items()}
    if len(schemes) > 1:
        raise NotImplementedError(f"quantization_config: config_groups {sorted(groups)} give "
                                  f"different schemes {sorted(map(str, schemes))}: one scheme "
                                  "for every layer is supported yet")
    return schemes.pop()


def _compressed_tensors_group(name: str, group: dict, fmt) -> QuantConfig:
    weights = group.get("weights") or {}
    kind, bits = weights.get("type"), weights.get("num_bits")
    if (kind, bits) == ("int", 4):
        return _compressed_tensors_int4(name, group, weights, fmt)
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


def _compressed_tensors_int4(name: str, group: dict, weights: dict, fmt) -> QuantConfig:
    """compressed-tensors int 4-bit weights in the ``pack-quantized`` format,
    per ``group`` (group_size) or per ``channel``; activations unquantized."""
    where = f"config_groups.{name}"
    fmt = group.get("format", fmt)
    if fmt != "pack-quantized":
        raise NotImplementedError(f"quantization_config: {where} int4 weights in format {fmt!r} "
                                  "are not supported (expected 'pack-quantized')")
    if group.get("input_activations") is not None:
        raise NotImplementedError(f"quantization_config: {where} int4 weights with quantized "
                                  "input_activations (W4A8) are not supported yet")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise NotImplementedError(f"quantization_config: {where}.weights strategy={strategy!r} "
                                  "is not supported for int4 (expected group or channel)")
    if weights.get("actorder") not in (None, False, "static"):
        raise NotImplementedError(f"quantization_config: {where}.weights actorder="
                                  f"{weights.get('actorder')!r} (activation order, g_idx) is not "
                                  "supported yet")
    size = weights.get("group_size") if strategy == "group" else None
    config = QuantConfig.int4(_group_size(size, f"{where}.weights.group_size"),
                              bool(weights.get("symmetric", True)))
    return dataclasses.replace(config, packing="pack-quantized")


def _mxfp4_config(config: dict) -> QuantConfig:
    """``quant_method: mxfp4`` (gpt-oss): e2m1 weights, e8m0 scales per 32."""
    return QuantConfig.mxfp4()


def _bits4(config: dict, key: str, method: str):
    bits = config.get(key, 4)
    if bits != 4:
        raise NotImplementedError(f"quantization_config: {method} {key}={bits!r} is not "
                                  "supported (expected 4)")


def _group_size(size, key):
    """A checkpoint's group size: a positive even int, or -1/None for a whole row."""
    if size in (None, -1):
        return None
    if not isinstance(size, int) or size < 2 or size % 2:
        raise ValueError(f"quantization_config: {key}={size!r}, expected a positive even int "
                         "or -1 (one group a row)")
    return size


def _gptq_config(config: dict) -> QuantConfig:
    """``quant_method: gptq``: 4-bit int weights per ``group_size``, ``sym``
    (zero point 8) or not (zero points); activation order is not supported."""
    _bits4(config, "bits", "gptq")
    if config.get("desc_act"):
        raise NotImplementedError("quantization_config: gptq desc_act=True (activation order: "
                                  "a g_idx permutation of the groups) is not supported yet")
    scheme = QuantConfig.int4(_group_size(config.get("group_size", 128), "group_size"),
                              bool(config.get("sym", True)))
    v2 = config.get("checkpoint_format") == "gptq_v2"
    return dataclasses.replace(scheme, packing="gptq_v2" if v2 else "gptq")


def _awq_config(config: dict) -> QuantConfig:
    """``quant_method: awq``: 4-bit int weights per ``group_size``, with zero
    points unless ``zero_point`` is false."""
    bits_key = "w_bit" if "w_bit" in config else "bits"
    _bits4(config, bits_key, "awq")
    version = config.get("version", "gemm")
    if str(version).lower() != "gemm":
        raise NotImplementedError(f"quantization_config: awq version={version!r} is not "
                                  "supported (expected 'gemm': qweight [K, N/8])")
    size = config.get("group_size", config.get("q_group_size", 128))
    scheme = QuantConfig.int4(_group_size(size, "group_size"),
                              symmetric=not config.get("zero_point", True))
    return dataclasses.replace(scheme, packing="awq")


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
    "mxfp4": _mxfp4_config,
    "gptq": _gptq_config,
    "awq": _awq_config,
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
    hold. One expert at a time, so the float temporaries stay one expert's size.

    4-bit configs return (packed uint8 [E, N, K/2], scales [E, N, K/group])
    and, with zero points, their uint8 [E, N, K/group] third; see
    ``_mxfp4_codes`` and ``_int4_codes`` for the rounding."""
    if w.dim() != 3:
        raise ValueError(f"quantize_weight: w must be [E, N, K], got shape {tuple(w.shape)}")
    if config.packed4:
        return _quantize_packed4(w, config)
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


# e2m1 magnitudes by code (bit 3 is the sign), and the midpoints between them.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
INT4_SYMMETRIC_ZERO = 8


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., K] -> uint8 [..., K/2], the even k in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _quantize_packed4(w: torch.Tensor, config: QuantConfig):
    e, n, k = w.shape
    if k % 2:
        raise ValueError(f"quantize_weight: 4-bit weights need an even K, got shape "
                         f"{tuple(w.shape)}")
    group = config.group_of(k)
    mx = config.weight_dtype == "mxfp4"
    scale_dtype = torch.uint8 if mx else (
        w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32)
    packed = torch.empty((e, n, k // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((e, n, k // group), dtype=scale_dtype, device=w.device)
    zero = torch.empty(scale.shape, dtype=torch.uint8, device=w.device) \
        if config.zero_point else None
    for i in range(e):
        groups = w[i].double().reshape(n, k // group, group)
        if mx:
            codes, scale[i] = _mxfp4_codes(groups)
        else:
            codes, scale[i], z = _int4_codes(groups, scale_dtype, config.zero_point)
            if zero is not None:
                zero[i] = z
        packed[i] = pack_4bit(codes.reshape(n, k))
    return (packed, scale) if zero is None else (packed, scale, zero)


def _mxfp4_codes(groups: torch.Tensor):
    """Groups [N, G, 32] (float64) -> (e2m1 codes, e8m0 exponent bytes [N, G]).

    The shared exponent is the smallest power of two 2^x with amax <= 6 * 2^x,
    so no element saturates (OCP MX's floor(log2(amax)) - 2 may clip values in
    (6, 8) * 2^x to 6); x is clamped to e8m0's [-127, 127] (an all-zero group
    gets 2^-127). Elements round to the nearest e2m1 value, ties to the even
    code."""
    amax = groups.abs().amax(dim=-1)
    x = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(-127, 127)
    # log2 of a rounded quotient can be one off: settle on the exact smallest x.
    x = torch.where(amax > E2M1_MAX * torch.exp2(x), x + 1, x)
    x = torch.where((x > -127) & (amax <= E2M1_MAX * torch.exp2(x - 1)), x - 1, x)
    x = x.clamp(-127, 127)
    v = groups / torch.exp2(x)[..., None]
    mag = v.abs().clamp(max=E2M1_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=mag.dtype, device=mag.device)
    code = torch.bucketize(mag, mids)  # a midpoint goes to the lower code
    tie = (code < 7) & (mag == mids[code.clamp(max=6)]) & (code % 2 == 1)
    code = code + tie.long()
    code = torch.where((v < 0) & (code > 0), code | 8, code)
    return code, (x + 127).to(torch.uint8)


def _int4_codes(groups: torch.Tensor, scale_dtype: torch.dtype, zero_point: bool):
    """Groups [N, G, g] (float64) -> (codes, scales [N, G] in scale_dtype,
    zero points uint8 [N, G]). Symmetric: scale amax / 7, zero 8. Asymmetric
    (GPTQ's): the range [min(w, 0), max(w, 0)] in 15 steps, zero
    round(-min / scale). Codes round(w / scale) + zero (half to even), clamped
    to [0, 15], from the scale as stored (rounded to scale_dtype)."""
    tiny = torch.finfo(scale_dtype).tiny
    if zero_point:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=tiny).to(scale_dtype)
        zero = torch.round(-lo / scale.double()).clamp(0, 15)
    else:
        scale = (groups.abs().amax(dim=-1) / 7).clamp(min=tiny).to(scale_dtype)
        zero = torch.full(scale.shape, INT4_SYMMETRIC_ZERO, dtype=torch.float64,
                          device=scale.device)
    q = torch.round(groups / scale.double()[..., None]) + zero[..., None]
    return q.clamp(0, 15).long(), scale, zero.to(torch.uint8)


def dequantize_packed4(q: torch.Tensor, scale: torch.Tensor, zero_point=None,
                       dtype=torch.float32) -> torch.Tensor:
    """4-bit weights uint8 [E, N, K/2] with scales [E, N, K/g] (e8m0: mxfp4;
    floats: int4, zero points or 8) -> weights [E, N, K] in ``dtype``."""
    codes = unpack_4bit(q).long()
    group = codes.shape[-1] // scale.shape[-1]
    work = torch.promote_types(dtype, torch.float32)  # float64 keeps 6 * 2^127 finite
    if scale.dtype in E8M0_DTYPES:
        exponent = scale.view(torch.uint8).int()
        s = torch.ldexp(torch.ones_like(exponent, dtype=work), exponent - 127)
        s = torch.where(exponent == 255, torch.nan, s)
        table = torch.tensor(E2M1_MAGNITUDES, dtype=work, device=q.device)
        values = torch.where(codes >= 8, -table[codes & 7], table[codes & 7])
    else:
        s = scale.to(work)
        zero = INT4_SYMMETRIC_ZERO if zero_point is None else \
            zero_point.long().repeat_interleave(group, dim=-1)
        values = (codes - zero).to(work)
    return (values * s.repeat_interleave(group, dim=-1)).to(dtype)


# AWQ packs the 8 columns of an int32 in the order 0, 2, 4, 6, 1, 3, 5, 7: column j
# sits in nibble AWQ_REVERSE_ORDER[j].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _int32_nibbles(t: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> codes int64 [..., 8 C], nibble i of t[..., c] at 8 c + i."""
    shifts = torch.arange(0, 32, 4, device=t.device)
    return ((t.long()[..., None] >> shifts) & 15).flatten(-2)


def _zero_points(zeros: torch.Tensor, name: str) -> torch.Tensor:
    if zeros.min() < 0 or zeros.max() > 15:
        raise ValueError(f"{name}: zero points must be in [0, 15], got [{zeros.min().item()}, "
                         f"{zeros.max().item()}]")
    return zeros.to(torch.uint8)


def gptq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's (and compressed-tensors' transposed) weight int32 [..., K/8, N],
    8 codes along K a word (k = 8 r + i in nibble i) -> packed uint8 [..., N, K/2]."""
    return pack_4bit(_int32_nibbles(qweight.mT))


def gptq_qzeros(qzeros: torch.Tensor, v2: bool = False) -> torch.Tensor:
    """GPTQ's zero points int32 [..., K/g, N/8], 8 along N a word, stored as
    zero - 1 unless ``v2`` (checkpoint_format gptq_v2) -> uint8 [..., N, K/g]."""
    zeros = _int32_nibbles(qzeros) + (0 if v2 else 1)
    return _zero_points(zeros, "qzeros").mT.contiguous()


def _awq_columns(t: torch.Tensor) -> torch.Tensor:
    codes = _int32_nibbles(t)
    return codes.view(*codes.shape[:-1], -1, 8)[..., list(AWQ_REVERSE_ORDER)].flatten(-2)


def awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ's (GEMM) weight int32 [..., K, N/8], 8 along N a word in AWQ's
    order -> packed uint8 [..., N, K/2]."""
    return pack_4bit(_awq_columns(qweight).mT)


def awq_qzeros(qzeros: torch.Tensor) -> torch.Tensor:
    """AWQ's zero points int32 [..., K/g, N/8] in AWQ's order -> uint8 [..., N, K/g]."""
    return _zero_points(_awq_columns(qzeros), "qzeros").mT.contiguous()


def group_scales(scales: torch.Tensor) -> torch.Tensor:
    """GPTQ's and AWQ's scales [..., K/g, N] -> [..., N, K/g]."""
    return scales.mT.contiguous()


def ct_weight_packed(weight_packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' weight_packed int32 [..., N, K/8], 8 codes along K
    a word, each code the signed value + 8 -> packed uint8 [..., N, K/2]: the
    same codes (zero point 8 when symmetric)."""
    return pack_4bit(_int32_nibbles(weight_packed))


def ct_weight_zero_point(zero_point: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' weight_zero_point int32 [..., N/8, K/g], packed along
    N, each the signed zero point + 8 -> uint8 [..., N, K/g]: the zero of the
    codes of ct_weight_packed."""
    return _zero_points(_int32_nibbles(zero_point.mT), "weight_zero_point").mT.contiguous()


def int4_checkpoint_tensor(name: str, tensor: torch.Tensor, packing: str | None) -> torch.Tensor:
    """One int4 checkpoint tensor of a projection, ``name`` its last part
    (qweight, qzeros, scales; weight_packed, weight_zero_point), in the layout
    of the 4-bit op contract ([N, K/2] codes, [N, K/g] scales and zero
    points). Tensors already in it (uint8 zero points, compressed-tensors'
    [N, K/g] weight_scale) come back as they are."""
    if name == "scales":
        return group_scales(tensor)
    if tensor.dtype != torch.int32:
        return tensor
    if name == "weight_packed":
        return ct_weight_packed(tensor)
    if name == "weight_zero_point":
        return ct_weight_zero_point(tensor)
    if packing not in ("gptq", "gptq_v2", "awq"):
        raise ValueError(f"{name}: GPTQ's and AWQ's int32 {name} differ in packing, and "
                         f"the layer's quant_config has packing={packing!r}: expected the "
                         "checkpoint's quantization_config (quant_method gptq or awq)")
    if packing == "awq":
        return awq_qweight(tensor) if name == "qweight" else awq_qzeros(tensor)
    return gptq_qweight(tensor) if name == "qweight" else gptq_qzeros(tensor, packing == "gptq_v2")


def check_trivial_g_idx(g_idx: torch.Tensor, group: int, name: str) -> None:
    """GPTQ's g_idx (group of each input column) must be k // group: activation
    order (desc_act) permutes the columns, which the kernels do not do."""
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group
    if g_idx.dim() != 1 or not torch.equal(g_idx.long(), expected):
        raise NotImplementedError(f"{name}: g_idx is not k // group_size ({group}): activation "
                                  "order (desc_act) is not supported yet")


def repack_gptq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None = None,
                v2: bool = False):
    """One GPTQ projection (``qweight`` int32 [K/8, N], 8 codes along K a word,
    k = 8 r + i in nibble i; ``scales`` [K/g, N]; ``qzeros`` int32 [K/g, N/8]
    along N, stored as zero - 1 unless the checkpoint_format is ``gptq_v2``)
    -> (packed uint8 [N, K/2], scales [N, K/g], zero points uint8 [N, K/g]
    or None without qzeros: zero 8, symmetric). Once at load time."""
    zeros = None if qzeros is None else gptq_qzeros(qzeros, v2)
    return gptq_qweight(qweight), group_scales(scales), zeros


def repack_awq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor):
    """One AWQ (GEMM) projection (``qweight`` int32 [K, N/8] and ``qzeros``
    int32 [K/g, N/8], 8 codes along N a word in AWQ's order; ``scales``
    [K/g, N]) -> (packed uint8 [N, K/2], scales [N, K/g], zero points uint8
    [N, K/g]). Once at load time."""
    return awq_qweight(qweight), group_scales(scales), awq_qzeros(qzeros)


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
                      dtype=torch.float32, zero_point=None) -> torch.Tensor:
    """fp8 weights [E, N, K] and their scales (block when block_shape is given,
    else channel [E, N] or tensor [E]) -> weights in ``dtype``; 4-bit (uint8)
    weights with their scales and zero points as ``dequantize_packed4``."""
    if q.dtype == torch.uint8:
        return dequantize_packed4(q, scale, zero_point, dtype)
    return (q.float() * expand_weight_scale(scale, q.shape, block_shape)).to(dtype)
