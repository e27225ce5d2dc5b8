"""FusedMoE with 4-bit experts: the parameters it creates, online quantization
of a float checkpoint, and its forward against fused_experts on the same
quantized weights (CPU)."""

import pytest
import torch

import fused_moe
from fused_moe import FusedMoE, quant
from conftest import rel_err

E, K, H, I = 5, 2, 192, 192  # multiples of 32 and of 64, not of 128


def float_experts(activation="silu"):
    w13 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(E, H, I, dtype=torch.bfloat16) * I**-0.5
    return w13, w2


def load_per_expert(layer, w13, w2):
    for e in range(E):
        for shard, w in (("w1", w13[e, :I]), ("w3", w13[e, I:]), ("w2", w2[e])):
            param = layer.w2_weight if shard == "w2" else layer.w13_weight
            layer.weight_loader(param, w, f"experts.{e}.{shard}.weight", shard, e)


def expected(layer, x, logits, w13, w2):
    """fused_experts on the checkpoint quantized whole, one expert at a time."""
    config = layer.quant_config
    q13, q2 = quant.quantize_weight(w13, config), quant.quantize_weight(w2, config)
    zp = {"w13_zp": q13[2], "w2_zp": q2[2]} if config.zero_point else {}
    tw, ti = layer.route(x, logits)
    return fused_moe.fused_experts(x, q13[0], q2[0], tw, ti, activation=layer.activation,
                                   w13_scale=q13[1], w2_scale=q2[1], **zp)


@pytest.mark.parametrize("name", ["mxfp4", "int4-g64", "int4-g32", "int4-g128-asym"])
def test_params_have_vllm_names_and_shapes(name):
    if name == "int4-g128-asym":
        layer = FusedMoE(E, K, 256, 128, params_dtype=torch.bfloat16, quant_config=name)
        h, i = 256, 128
    else:
        layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=name)
        h, i = H, I
    config = quant.as_quant_config(name)
    g = config.group_size
    params = dict(layer.named_parameters())
    assert params["w13_weight"].dtype == torch.uint8
    assert params["w13_weight"].shape == (E, 2 * i, h // 2)
    assert params["w2_weight"].shape == (E, h, i // 2)
    assert params["w13_weight_scale"].shape == (E, 2 * i, h // g)
    assert params["w2_weight_scale"].shape == (E, h, i // g)
    scale_dtype = torch.uint8 if name == "mxfp4" else torch.bfloat16
    assert params["w13_weight_scale"].dtype == scale_dtype
    assert ("w13_weight_zero_point" in params) == config.zero_point


@pytest.mark.parametrize("name", ["mxfp4", "int4-g64", "int4-g32"])
def test_online_quantization_matches_fused_experts(name):
    w13, w2 = float_experts()
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=name)
    load_per_expert(layer, w13, w2)
    x = torch.randn(23, H, dtype=torch.bfloat16)
    logits = torch.randn(23, E)
    out = layer(x, logits)
    assert torch.equal(out, expected(layer, x, logits, w13, w2))
    dense = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16)
    with torch.no_grad():
        dense.w13_weight.copy_(w13), dense.w2_weight.copy_(w2)
    print(f"{name}: vs the unquantized layer {rel_err(out, dense(x, logits)):.2e}")


def test_asymmetric_int4_whole_layer_load():
    h, i = 256, 128
    w13 = torch.randn(E, 2 * i, h, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(E, h, i, dtype=torch.bfloat16) * i**-0.5
    layer = FusedMoE(E, K, h, i, params_dtype=torch.bfloat16, quant_config="int4-g128-asym")
    layer.weight_loader(layer.w13_weight, w13, "experts.w13_weight", "w13", None)
    layer.weight_loader(layer.w2_weight, w2, "experts.w2_weight", "w2", None)
    x = torch.randn(11, h, dtype=torch.bfloat16)
    logits = torch.randn(11, E)
    assert torch.equal(layer(x, logits), expected(layer, x, logits, w13, w2))


def test_mxfp4_swigluoai_interleaved():
    w13, w2 = float_experts()
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="mxfp4",
                     activation="swigluoai")
    load_per_expert(layer, w13.view(E, I, 2, H).transpose(1, 2).reshape(E, 2 * I, H), w2)
    x = torch.randn(7, H, dtype=torch.bfloat16)
    logits = torch.randn(7, E)
    # w1 rows are the gates, w3 rows the ups: loaded interleaved, as w13 itself.
    assert torch.equal(layer(x, logits), expected(layer, x, logits, w13, w2))


def test_gpt_oss_mxfp4_tensors_load_as_they_are():
    """gpt-oss's *_blocks [E, N, K/32, 16] and e8m0 *_scales, whole-layer, by load_weights."""
    w13, w2 = float_experts()
    q13, s13 = quant.quantize_weight(w13, quant.QuantConfig.mxfp4())
    q2, s2 = quant.quantize_weight(w2, quant.QuantConfig.mxfp4())
    b13 = torch.randn(E, 2 * I, dtype=torch.bfloat16) * 0.1
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="mxfp4",
                     activation="swigluoai", has_bias=True, prefix="mlp.experts")
    checkpoint = {
        "mlp.experts.gate_up_proj_blocks": q13.view(E, 2 * I, H // 32, 16),
        "mlp.experts.gate_up_proj_scales": s13.view(torch.float8_e8m0fnu),
        "mlp.experts.gate_up_proj_bias": b13,
        "mlp.experts.down_proj_blocks": q2.view(E, H, I // 32, 16),
        "mlp.experts.down_proj_scales": s2,
        "mlp.experts.down_proj_bias": torch.zeros(E, H, dtype=torch.bfloat16),
    }
    loaded = layer.load_weights(checkpoint.items())
    assert {"mlp.experts.w13_weight", "mlp.experts.w13_weight_scale"} <= loaded
    assert torch.equal(layer.w13_weight, q13) and torch.equal(layer.w2_weight_scale, s2)
    x = torch.randn(9, H, dtype=torch.bfloat16)
    logits = torch.randn(9, E)
    tw, ti = layer.route(x, logits)
    assert torch.equal(layer(x, logits), fused_moe.fused_experts(
        x, q13, q2, tw, ti, activation="swigluoai", w13_bias=b13, w13_scale=s13, w2_scale=s2,
        w2_bias=layer.w2_bias))


def test_packed_weight_of_the_wrong_shape_names_it():
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="mxfp4")
    with pytest.raises(ValueError, match=r"gate_up_proj_blocks .*expected \[5, 384, 96\]"):
        layer.weight_loader(layer.w13_weight, torch.zeros(E, 2 * I, H, dtype=torch.uint8),
                            "mlp.experts.gate_up_proj_blocks", "w13", None)
