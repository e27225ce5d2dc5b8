"""gpt-oss's MXFP4 experts (transformers' Mxfp4GptOssExperts) on the
"fused_moe" experts implementation, on the CPU.

transformers builds Mxfp4GptOssExperts only with the triton kernels hub and
accelerate, which a CPU test cannot have: without them
``Mxfp4Config(dequantize=False)`` raises (no accelerate) or falls back to
dequantizing. So the reference is transformers' own dequantized loading of an
MXFP4 checkpoint (``Mxfp4Config(dequantize=True)``, i.e. ``Mxfp4Dequantize``),
and the MXFP4 model is that model with its MLPs replaced as transformers'
``replace_with_mxfp4_linear`` replaces them, the experts' state set from the
same checkpoint tensors as after loading: ``gate_up_proj``/``down_proj`` the
checkpoint's ``*_blocks`` viewed [E, N, K/2] (the shape Mxfp4GptOssExperts
declares), the e8m0 ``*_scales`` on the module, fp32 biases. The hub's own
tensors are stood in for by objects with its ``.storage.data``/``.storage.layout``.
"""

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fused_moe.integrations.transformers")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
safetensors = pytest.importorskip("safetensors.torch")

from fused_moe.quant import QuantConfig, quantize_weight  # noqa: E402

# ||fused - reference|| <= RTOL * ||reference|| (Frobenius), bf16 activations.
RTOL = 3.5e-2

E, H, I = 4, 64, 96  # experts, hidden, intermediate (multiples of 32)
CONFIG = dict(vocab_size=128, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
              num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
              max_position_embeddings=128, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny gpt-oss MXFP4 checkpoint in gpt-oss's layout: experts as
    *_blocks [E, N, K/32, 16] and e8m0 *_scales [E, N, K/32], quantized by
    fused_moe.quant from a random bf16 model; the rest as it is."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**CONFIG)
    model = transformers.GptOssForCausalLM(config).eval()
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = t.transpose(1, 2).contiguous()  # GptOssExperts stores [E, K, N]
            packed, scales = quantize_weight(w, QuantConfig.mxfp4())
            tensors[name + "_blocks"] = packed.reshape(*scales.shape, 16).contiguous()
            tensors[name + "_scales"] = scales.contiguous()
        elif name.endswith("_bias"):  # random biases (they start at zero)
            tensors[name] = (0.1 * torch.randn(t.shape)).to(t.dtype)
        else:
            tensors[name] = t.contiguous()
    tensors.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    safetensors.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.quantization_config = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    config.save_pretrained(path)
    return path, tensors


def _dequantized(path):
    """transformers' own dequantized loading of the MXFP4 checkpoint."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16,
        experts_implementation="eager").eval()


def _mxfp4_experts(config, tensors, prefix):
    """An Mxfp4GptOssExperts holding the checkpoint's tensors as they are."""
    with torch.device("meta"):
        experts = mxfp4.Mxfp4GptOssExperts(config)
    experts = experts.to_empty(device="cpu")
    for proj in ("gate_up_proj", "down_proj"):
        blocks = tensors[f"{prefix}.{proj}_blocks"]
        setattr(experts, proj, torch.nn.Parameter(blocks.view(*blocks.shape[:2], -1), requires_grad=False))
        experts.register_buffer(proj + "_scales", tensors[f"{prefix}.{proj}_scales"])
        bias = tensors[f"{prefix}.{proj}_bias"].to(torch.float32)
        setattr(experts, proj + "_bias", torch.nn.Parameter(bias, requires_grad=False))
    return experts


def _mxfp4_model(path, tensors):
    """The dequantized model with its MLPs replaced by Mxfp4GptOssMLP (as
    replace_with_mxfp4_linear does) on the packed checkpoint tensors."""
    model = _dequantized(path)
    for i, layer in enumerate(model.model.layers):
        experts = _mxfp4_experts(model.config, tensors, f"model.layers.{i}.mlp.experts")
        layer.mlp = mxfp4.Mxfp4GptOssMLP(layer.mlp.router, experts)
    return model


def _inputs():
    torch.manual_seed(1)
    return torch.randint(3, CONFIG["vocab_size"], (2, 11))


def _capture_experts(model, ids):
    """(hidden_states, top_k_index, top_k_weights, output) of each layer's experts."""
    captured, handles = [], []
    for layer in model.model.layers:
        handles.append(layer.mlp.experts.register_forward_hook(
            lambda mod, args, out: captured.append((*[a.clone() for a in args], out.clone()))))
    with torch.no_grad():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    return captured, logits


def test_dequantize_false_without_hub_is_not_mxfp4_experts():
    """What transformers does here: without accelerate/the kernels hub,
    MXFP4 experts are never built (ImportError or a dequantizing fallback)."""
    quantizer = pytest.importorskip("transformers.quantizers.quantizer_mxfp4")
    if quantizer.is_accelerate_available():
        pytest.skip("accelerate installed: transformers may build Mxfp4GptOssExperts")
    q = quantizer.Mxfp4HfQuantizer(transformers.Mxfp4Config(dequantize=False), pre_quantized=True)
    with pytest.raises(ImportError, match="Accelerate"):
        q.validate_environment()


def test_experts_match_transformers_dequantized(checkpoint):
    path, tensors = checkpoint
    ids = _inputs()
    reference, ref_logits = _capture_experts(_dequantized(path), ids)
    model = _mxfp4_model(path, tensors)
    model.set_experts_implementation("fused_moe")
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "fused_moe"
    # Module by module, on the reference's captured inputs.
    for layer, (x, index, weights, out) in zip(model.model.layers, reference):
        with torch.no_grad():
            got = layer.mlp.experts(x, index, weights)
        assert got.dtype == out.dtype and got.shape == out.shape
        assert _rel(got, out) <= RTOL
    # The whole model through Mxfp4GptOssMLP's (patched) forward.
    fused, logits = _capture_experts(model, ids)
    assert len(fused) == len(reference)
    assert _rel(logits, ref_logits) <= RTOL


def test_from_pretrained_experts_implementation_reaches_mxfp4_experts(checkpoint):
    path, tensors = checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16,
        experts_implementation="fused_moe")
    experts = _mxfp4_experts(model.config, tensors, "model.layers.0.mlp.experts")
    assert hf._mxfp4_uses_fused_moe(experts)


def test_packed_weights_used_in_place(checkpoint, monkeypatch):
    path, tensors = checkpoint
    model = _mxfp4_model(path, tensors)
    model.set_experts_implementation("fused_moe")
    seen = []
    real = hf.fused_experts

    def spy(x, w13, w2, *args, **kwargs):
        seen.append((w13, w2, kwargs["w13_scale"], kwargs["w2_scale"], kwargs["activation"]))
        return real(x, w13, w2, *args, **kwargs)

    monkeypatch.setattr(hf, "fused_experts", spy)
    with torch.no_grad():
        model(_inputs())
    assert len(seen) == len(model.model.layers)
    for layer, (w13, w2, s13, s2, act) in zip(model.model.layers, seen):
        experts = layer.mlp.experts
        assert act == "swigluoai"
        assert w13.dtype == w2.dtype == s13.dtype == s2.dtype == torch.uint8
        assert w13.data_ptr() == experts.gate_up_proj.data_ptr()
        assert w2.data_ptr() == experts.down_proj.data_ptr()
        assert s13.data_ptr() == experts.gate_up_proj_scales.data_ptr()
        assert s2.data_ptr() == experts.down_proj_scales.data_ptr()
        # The only cached copies are the biases in the activations' dtype.
        cache = experts.__dict__["_fused_moe_cache"]
        assert set(cache) == {"gate_up_proj_bias", "down_proj_bias"}
        assert sum(t.numel() for _, t in cache.values()) == E * (2 * I + H)


def test_other_implementation_keeps_transformers_forward(checkpoint, monkeypatch):
    path, tensors = checkpoint
    experts = _mxfp4_experts(transformers.GptOssConfig(**CONFIG), tensors, "model.layers.0.mlp.experts")
    experts.config._experts_implementation = "eager"
    called = []
    monkeypatch.setattr(hf, "mxfp4_experts_forward", lambda *a: called.append(a))
    # transformers' own forward needs the kernels hub, which was never loaded.
    with pytest.raises(NameError, match="triton_kernels_hub"):
        experts(torch.zeros(3, H, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert not called


class StridedLayout:  # the hub's plain layout: data as it is
    def unswizzle_data(self, data):
        return data


class HopperMXValueLayout:  # a swizzled layout: unswizzling makes a copy
    def unswizzle_data(self, data):
        return data.clone()


def _hub_tensor(t, layout):
    """What the hub stores for a [E, N, K] tensor: its [E, K, N] transpose."""
    return types.SimpleNamespace(storage=types.SimpleNamespace(data=t.transpose(-1, -2), layout=layout))


@pytest.mark.parametrize("layout", [StridedLayout, HopperMXValueLayout])
def test_hub_tensors(checkpoint, layout):
    path, tensors = checkpoint
    config = transformers.GptOssConfig(**CONFIG)
    config._experts_implementation = "fused_moe"
    plain = _mxfp4_experts(config, tensors, "model.layers.1.mlp.experts")
    hub = _mxfp4_experts(config, tensors, "model.layers.1.mlp.experts")
    for proj in ("gate_up_proj", "down_proj"):
        weight = hub._parameters.pop(proj)
        setattr(hub, proj, _hub_tensor(weight.data, layout()))
        setattr(hub, proj + "_precision_config",
                types.SimpleNamespace(weight_scale=_hub_tensor(hub._buffers.pop(proj + "_scales"), layout())))
    torch.manual_seed(2)
    x = torch.randn(7, H, dtype=torch.bfloat16)
    index = torch.randint(0, E, (7, 2))
    weights = torch.softmax(torch.randn(7, 2), dim=-1)
    with torch.no_grad():
        assert torch.equal(hub(x, index, weights), plain(x, index, weights))
    w13, _ = hf._mxfp4_weight(hub, "gate_up_proj", 2 * I, H)
    in_place = w13.data_ptr() == hub.gate_up_proj.storage.data.data_ptr()
    assert in_place == (layout is StridedLayout)


def test_refusals(checkpoint):
    path, tensors = checkpoint
    prefix = "model.layers.0.mlp.experts"
    x, index, weights = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)

    config = transformers.GptOssConfig(**CONFIG, swiglu_limit=10.0)
    config._experts_implementation = "fused_moe"
    with pytest.raises(NotImplementedError, match="Mxfp4GptOssExperts.*limit=10.0"):
        _mxfp4_experts(config, tensors, prefix)(x, index, weights)

    config = transformers.GptOssConfig(**CONFIG)
    config._experts_implementation = "fused_moe"
    experts = _mxfp4_experts(config, tensors, prefix)
    experts._is_hooked = True
    with pytest.raises(NotImplementedError, match="Mxfp4GptOssExperts.*expert parallelism"):
        experts(x, index, weights)

    experts = _mxfp4_experts(config, tensors, prefix)
    del experts._buffers["down_proj_scales"]
    with pytest.raises(NotImplementedError, match="down_proj without its MXFP4 scales"):
        experts(x, index, weights)

    experts = _mxfp4_experts(config, tensors, prefix)
    experts.gate_up_proj_scales = experts.gate_up_proj_scales[:, :, :1]
    with pytest.raises(NotImplementedError, match="gate_up_proj scales of torch.uint8"):
        experts(x, index, weights)
