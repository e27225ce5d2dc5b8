"""The "fused_moe" experts implementation in transformers models: logits and
greedy generation match transformers' own "eager" experts, model by model, on
tiny randomly initialised configs (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fused_moe.integrations.transformers")

# fp32: max |fused - eager| <= FP32_RTOL * max |eager|.
FP32_RTOL = 1e-4
# bf16: ||fused - eager|| <= BF16_RTOL * ||eager|| (Frobenius); both round
# every layer's activations to bf16, in different orders.
BF16_RTOL = 2e-2

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)

# family -> (config class, model class, config arguments beyond COMMON).
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=36, num_experts=8,
                       shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                       head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=44, num_experts=8)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=32, num_local_experts=8, embedding_multiplier=2.0,
                        residual_multiplier=0.5, logits_scaling=2.0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=40, n_routed_experts=8,
                         n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                         routed_scaling_factor=2.5, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=48, num_local_experts=8, head_dim=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])),
}


def _device(name):
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_moe::fused_experts", "CUDA"):
            pytest.skip("fused_moe was built without CUDA kernels")
    return torch.device(name)


def _model(family, device, dtype=torch.float32):
    config_cls, model_cls, extra = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(config, experts_implementation="eager")
    _randomize_extras(model)
    return model.to(device=device, dtype=dtype).eval()


def _randomize_extras(model):
    """Give the parts that initialise to zero (biases, DeepSeek's selection
    bias) random values so the tests exercise them; large gpt-oss biases push
    some pre-activations past its clamp limit of 7."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("proj_bias", "e_score_correction_bias")):
                tensor.normal_(0.0, 4.0 if "gate_up" in name else 0.5)


def _tokens(device, batch=2, length=12):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _expect_fused_calls(monkeypatch):
    """Counts fused_experts calls, so a test fails if dispatch fell back to eager."""
    calls = []
    real = hf.fused_experts
    monkeypatch.setattr(hf, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_fp32(family, device, monkeypatch):
    model = _model(family, _device(device))
    tokens = _tokens(device)
    eager = _logits(model, tokens)
    calls = _expect_fused_calls(monkeypatch)
    model.set_experts_implementation("fused_moe")
    fused = _logits(model, tokens)
    assert calls, "the fused_moe experts implementation was not called"
    err = (fused - eager).abs().max().item()
    assert err <= FP32_RTOL * eager.abs().max().item(), f"{family}: max abs diff {err}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bf16(family, device):
    model = _model(family, _device(device), torch.bfloat16)
    tokens = _tokens(device)
    eager = _logits(model, tokens)
    model.set_experts_implementation("fused_moe")
    fused = _logits(model, tokens)
    rel = ((fused - eager).norm() / eager.norm()).item()
    assert rel <= BF16_RTOL, f"{family}: relative Frobenius diff {rel}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy(family, device):
    model = _model(family, _device(device))
    tokens = _tokens(device, batch=1, length=6)
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(tokens, **options)
        model.set_experts_implementation("fused_moe")
        fused = model.generate(tokens, **options)
    assert torch.equal(fused, eager)


def test_from_config_selects_fused_moe(monkeypatch):
    config_cls, model_cls, extra = FAMILIES["qwen3_moe"]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="fused_moe")
    assert model.config._experts_implementation == "fused_moe"
    calls = _expect_fused_calls(monkeypatch)
    _logits(model, _tokens("cpu"))
    assert len(calls) == COMMON["num_hidden_layers"]


def test_transposed_copy_made_once_and_remade_after_update():
    model = _model("gpt_oss", torch.device("cpu"))
    model.set_experts_implementation("fused_moe")
    experts = model.model.layers[0].mlp.experts
    tokens = _tokens("cpu")
    _logits(model, tokens)
    first = experts._fused_moe_cache["gate_up_proj"][1]
    _logits(model, tokens)
    assert experts._fused_moe_cache["gate_up_proj"][1] is first
    with torch.no_grad():
        experts.gate_up_proj.mul_(2.0)
    _logits(model, tokens)
    remade = experts._fused_moe_cache["gate_up_proj"][1]
    assert remade is not first
    torch.testing.assert_close(remade, experts.gate_up_proj.detach().transpose(1, 2))


def test_unsupported_activation_names_the_module():
    config_cls, model_cls, extra = FAMILIES["qwen3_moe"]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, "hidden_act": "gelu_fast"})
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="fused_moe")
    with pytest.raises(NotImplementedError, match="Qwen3MoeExperts.*FastGELUActivation"):
        _logits(model, _tokens("cpu"))


def test_unsupported_swiglu_limit_is_refused():
    model = _model("gpt_oss", torch.device("cpu"))
    model.set_experts_implementation("fused_moe")
    model.model.layers[0].mlp.experts.limit = 10.0
    with pytest.raises(NotImplementedError, match="GptOssExperts.*limit=10.0"):
        _logits(model, _tokens("cpu"))


def test_non_gated_experts_module(monkeypatch):
    """NemotronH's experts (up_proj only, relu2) as a module on their own: the
    model around them is a Mamba hybrid, too slow for a CPU test."""
    modeling = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    config = transformers.NemotronHConfig(hidden_size=64, moe_intermediate_size=36, n_routed_experts=8,
                                          mlp_hidden_act="relu2", moe_latent_size=None)
    config._experts_implementation = "eager"
    experts = modeling.NemotronHExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.2)
        x = torch.randn(10, 64)
        ids = torch.rand(10, 8).topk(2).indices
        weights = torch.rand(10, 2).softmax(-1)
        eager = experts(x, ids, weights)
        calls = _expect_fused_calls(monkeypatch)
        config._experts_implementation = "fused_moe"
        fused = experts(x, ids, weights)
    assert calls and not experts.has_gate
    assert (fused - eager).abs().max() <= FP32_RTOL * eager.abs().max()
