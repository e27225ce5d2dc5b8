"""The "fused_moe" experts implementation on transformers' FineGrainedFP8
experts (FP8Experts: e4m3 weights, fp32 or ue8m0 ``*_scale_inv``): logits of
tiny random models, and single modules, match transformers' own FP8Experts
forward on the same fp8 weights and scales.

transformers' FP8 forward multiplies through the finegrained-fp8 Triton kernel
(downloaded from the Hub, CUDA only). On CPU, and on GPUs without that
kernel, it runs here on a float32 stand-in for the kernel's matmul that
quantizes activations the same way (e4m3, per token per block_size[1]
columns, scale amax / 448); test_against_transformers_kernel compares with
the kernel itself where it loads."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
hf = pytest.importorskip("fused_moe.integrations.transformers")

from test_transformers import (  # noqa: E402
    COMMON, FAMILIES, _device, _expect_fused_calls, _randomize_extras, _tokens)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
# ||fused - transformers|| <= FP8_RTOL * ||transformers|| (Frobenius).
FP8_RTOL = 3.5e-2

# family -> sizes replacing the bf16 tests' ones: the expert GEMMs span
# several 128-blocks, with partial last blocks (H = 192, I = 192) in the
# first two.
FP8_SIZES = {
    "deepseek_v3": dict(hidden_size=256, moe_intermediate_size=192, intermediate_size=256),
    "qwen3_moe": dict(hidden_size=192, moe_intermediate_size=128),
    "mixtral": dict(hidden_size=128, intermediate_size=256),
    "qwen2_moe": dict(hidden_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=64),
}
# Every size a multiple of the block, as the Triton kernel's expert paths require.
ALIGNED_SIZES = {
    "deepseek_v3": dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=256),
    "qwen3_moe": dict(hidden_size=256, moe_intermediate_size=128),
}


def _dequantize(weight, scale, block_size):
    """weight [N, K] * its scales in float32: block_size (bn, bk) blocks with
    partial last ones, or with no block size one scale per row group
    (FP8Experts keeps one per half of gate_up_proj)."""
    rows, cols = weight.shape
    bn, bk = block_size or (rows // scale.shape[0], cols // scale.shape[1])
    full = scale.float().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return weight.float() * full


def _quantize_activations(x, group):
    """x [T, K] rounded through e4m3 per token per `group` columns, in float32."""
    cols = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -cols % group)).unflatten(-1, (-1, group))
    scale = padded.abs().amax(-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    q = (padded / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return q.flatten(-2)[..., :cols]


def _kernel_matmul(x, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None):
    """The stand-in for the kernel's matmul_2d, the one call FP8Experts' own
    forward makes: W8A8 with dynamic activation scales, output in output_dtype."""
    assert activation_scale is None, "static activations are not emulated"
    group = x.shape[-1] if block_size is None else block_size[1]
    out = _quantize_activations(x, group) @ _dequantize(weight, weight_scale_inv, block_size).T
    return out.to(output_dtype)


@pytest.fixture
def kernel_stand_in(monkeypatch):
    """transformers' FP8 forward with the stand-in matmul (it loads the kernel
    only while this global is None)."""
    stand_in = finegrained_fp8.FineGrainedFP8(matmul=_kernel_matmul, batched_matmul=None, grouped_matmul=None)
    monkeypatch.setattr(finegrained_fp8, "_FINEGRAINED_FP8", stand_in)


def _random_fp8(shape, gen):
    """e4m3 values of std 64 (most of the e4m3 range, none saturated)."""
    return torch.randn(shape, generator=gen).mul_(64.0).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def _random_scales(shape, fan_in, gen, scale_fmt="float"):
    """Block scales spread over 4 binades around 1 / (64 sqrt(fan_in)), so
    the weights have std ~1/sqrt(fan_in) and a block read with another
    block's scale is off by up to 4x."""
    scales = torch.rand(shape, generator=gen).mul_(4.0).sub_(2.0).exp2_().mul_(1.0 / (64.0 * fan_in**0.5))
    return scales.log2_().round_().exp2_() if scale_fmt == "ue8m0" else scales


def _fill_fp8_experts(experts, gen, device, scale_fmt="float"):
    """Fresh random fp8 weights and scales in a (meta) FP8Experts module."""
    experts.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in list(experts.named_parameters()):
            if param.dtype == FP8:
                param.copy_(_random_fp8(param.shape, gen))
                scale = getattr(experts, name + "_scale_inv")  # fp32, or float8_e8m0fnu for ue8m0
                scale.copy_(_random_scales(scale.shape, param.shape[-1], gen, scale_fmt))
    return experts.to(device)


def _fp8_model(family, device, sizes=FP8_SIZES, scale_fmt="float"):
    """A tiny random bf16 model whose experts are transformers' FP8Experts,
    built by transformers' FineGrainedFP8 module replacement (what loading
    with FineGrainedFP8Config does), with fresh fp8 weights and scales."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **sizes[family]})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(config, experts_implementation="eager")
    _randomize_extras(model)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    # Only the experts become FP8: the linears keep their random bf16 weights.
    linears = [re.escape(name) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quant = transformers.FineGrainedFP8Config(weight_block_size=BLOCK, scale_fmt=scale_fmt)
    finegrained_fp8.replace_with_fp8_linear(model, linears, quantization_config=quant, pre_quantized=True)
    gen = torch.Generator().manual_seed(2)
    experts = [m for m in model.modules() if isinstance(m, finegrained_fp8.FP8Experts)]
    assert experts, f"{family}: no FP8Experts after the FP8 replacement"
    for module in experts:
        _fill_fp8_experts(module, gen, device, scale_fmt)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _compare_logits(model, device, monkeypatch):
    tokens = _tokens(device)
    reference = _logits(model, tokens)
    calls = _expect_fused_calls(monkeypatch)
    model.set_experts_implementation("fused_moe")
    fused = _logits(model, tokens)
    assert len(calls) == sum(isinstance(m, finegrained_fp8.FP8Experts) for m in model.modules())
    return _rel(fused, reference)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("family", FP8_SIZES)
def test_fp8_logits(family, device, kernel_stand_in, monkeypatch):
    model = _fp8_model(family, _fp8_device(device))
    rel = _compare_logits(model, device, monkeypatch)
    assert rel <= FP8_RTOL, f"{family}: relative Frobenius diff {rel}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp8_logits_ue8m0_scales(device, kernel_stand_in, monkeypatch):
    model = _fp8_model("deepseek_v3", _fp8_device(device), scale_fmt="ue8m0")
    rel = _compare_logits(model, device, monkeypatch)
    assert rel <= FP8_RTOL, f"relative Frobenius diff {rel}"


@pytest.mark.parametrize("family", ALIGNED_SIZES)
def test_against_transformers_kernel(family, monkeypatch):
    """Against transformers' FP8 forward on its own kernels (Triton or DeepGEMM)."""
    device = _fp8_device("cuda")
    try:
        finegrained_fp8.load_finegrained_fp8_kernel()
    except ImportError as e:
        pytest.skip(f"transformers' finegrained-fp8 kernel does not load: {e}")
    model = _fp8_model(family, device, sizes=ALIGNED_SIZES)
    rel = _compare_logits(model, device, monkeypatch)
    assert rel <= FP8_RTOL, f"{family}: relative Frobenius diff {rel}"


def _fp8_device(name):
    device = _device(name)
    if device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    return device


def _fp8_experts(hidden, inter, device, has_gate=True, block_size=BLOCK, act="silu"):
    """An FP8Experts module as transformers' FP8 replacement builds one."""
    config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=8,
                                         hidden_act=act)
    config._experts_implementation = "eager"
    cls = finegrained_fp8.use_experts_implementation(
        experts_class=finegrained_fp8.FP8Experts, experts_interface=finegrained_fp8.ALL_FP8_EXPERTS_FUNCTIONS,
        has_gate=has_gate)
    with torch.device("meta"):
        experts = cls(config, block_size=block_size, has_gate=has_gate)
    return _fill_fp8_experts(experts, torch.Generator().manual_seed(3), device), config


def _routing(tokens, hidden, device, top_k=2):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    ids = torch.rand(tokens, 8, generator=gen).topk(top_k).indices.to(device)  # int64, as routers give them
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(device, torch.bfloat16)
    return x, ids, weights


def _compare_module(experts, config, device, monkeypatch):
    x, ids, weights = _routing(33, experts.hidden_dim, device)
    with torch.no_grad():
        reference = experts(x, ids, weights)
        calls = _expect_fused_calls(monkeypatch)
        config._experts_implementation = "fused_moe"
        fused = experts(x, ids, weights)
    assert calls and fused.dtype == x.dtype and fused.shape == x.shape
    return _rel(fused, reference)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("hidden, inter, has_gate, act, block_size", [
    (256, 128, True, "silu", BLOCK),
    (200, 72, True, "gelu", BLOCK),  # partial blocks everywhere
    (256, 192, False, "relu2", BLOCK),  # up_proj only
    (256, 128, True, "silu", None),  # one scale per expert (two for gate_up_proj)
    (192, 96, True, "silu", (128, 64)),
])
def test_fp8_experts_module(hidden, inter, has_gate, act, block_size, device, kernel_stand_in, monkeypatch):
    device = _fp8_device(device)
    experts, config = _fp8_experts(hidden, inter, device, has_gate, block_size, act)
    rel = _compare_module(experts, config, device, monkeypatch)
    assert rel <= FP8_RTOL, f"relative Frobenius diff {rel}"


def test_fp8_weights_and_scales_used_in_place(monkeypatch):
    """fused_experts gets the module's own fp8 weights and fp32 scales, not
    dequantized or copied ones."""
    experts, config = _fp8_experts(256, 128, torch.device("cpu"))
    seen = {}
    monkeypatch.setattr(hf, "fused_experts", lambda x, w13, w2, *a, **k: seen.update(w13=w13, w2=w2, **k) or x)
    config._experts_implementation = "fused_moe"
    experts(*_routing(5, 256, "cpu"))
    for mine, theirs in [("w13", "gate_up_proj"), ("w2", "down_proj"),
                         ("w13_scale", "gate_up_proj_scale_inv"), ("w2_scale", "down_proj_scale_inv")]:
        assert seen[mine].data_ptr() == getattr(experts, theirs).data_ptr(), mine
    assert seen["w13"].dtype == FP8 and seen["w13_scale"].dtype == torch.float32
    assert tuple(seen["block_shape"]) == BLOCK


def test_ue8m0_scales_converted_once():
    model = _fp8_model("qwen3_moe", torch.device("cpu"), scale_fmt="ue8m0")
    experts = next(m for m in model.modules() if isinstance(m, finegrained_fp8.FP8Experts))
    first = hf._fp8_args(experts)["w13_scale"]
    assert first.dtype == torch.float32
    assert torch.equal(first, experts.gate_up_proj_scale_inv.float())
    assert hf._fp8_args(experts)["w13_scale"] is first


def test_fp8_interface_has_fused_moe():
    """The FP8 interface knows "fused_moe", so FP8Experts dispatch to it
    (transformers raises KeyError for a name only the bf16 interface has)."""
    assert finegrained_fp8.ALL_FP8_EXPERTS_FUNCTIONS.get_interface("fused_moe", None) is hf.fp8_experts_forward


@pytest.mark.parametrize("change, message", [
    (dict(activation_scheme="static"), "static activation scales"),
    (dict(swiglu_alpha=1.702, swiglu_limit=7.0, limit=7.0), "gate options swiglu_alpha, limit"),
    (dict(gate_softcap=30.0, up_softcap=30.0), "gate options gate_softcap, up_softcap"),
])
def test_unsupported_fp8_experts_are_refused(change, message):
    experts, config = _fp8_experts(256, 128, torch.device("cpu"))
    for name, value in change.items():
        setattr(experts, name, value)
    config._experts_implementation = "fused_moe"
    with pytest.raises(NotImplementedError, match=f"FP8Experts.*{message}"):
        experts(*_routing(5, 256, "cpu"))


def test_fp8_split_gate_up_scales_are_refused():
    """2I < 128: FP8Experts keeps a scale row per half of gate_up_proj,
    which no 128-row block grid has."""
    experts, config = _fp8_experts(128, 32, torch.device("cpu"))
    assert experts.gate_up_proj_scale_inv.shape[1] == 2
    config._experts_implementation = "fused_moe"
    with pytest.raises(NotImplementedError, match=r"gate_up_proj_scale_inv of shape \(8, 2, 1\)"):
        experts(*_routing(5, 128, "cpu"))
