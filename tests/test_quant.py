"""Quantization schemes: the weight quantizer against a hand computation,
and the schemes read from checkpoints' quantization_config (as their
config.json files have them)."""

import math

import pytest
import torch

from fused_moe import reference
from fused_moe.quant import QuantConfig, as_quant_config, quantize_weight

FP8 = torch.float8_e4m3fn


def hand_scale(values: torch.Tensor) -> torch.Tensor:
    """The contract's rule, element by element: max(amax, 1e-10) / 448 in fp32."""
    amax = values.abs().max().float()
    return torch.maximum(amax, torch.tensor(1e-10)) / torch.tensor(448.0)


def hand_quantize(values, scale):
    return torch.clamp(values.float() / scale, -448.0, 448.0).to(FP8)


def bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape,block", [((3, 200, 300), (128, 128)), ((2, 64, 48), (32, 16)),
                                         ((1, 5, 7), (128, 128))])
def test_block_quantization_matches_hand_computation(shape, block):
    w = torch.randn(shape).bfloat16() * 3
    w[0, :block[0], :block[1]] = 0  # an all-zero block: the 1e-10 floor, q = 0
    q, scale = quantize_weight(w, QuantConfig.fp8_block(block))
    bn, bk = block
    e, n, k = shape
    assert q.dtype == FP8 and scale.dtype == torch.float32
    assert scale.shape == (e, math.ceil(n / bn), math.ceil(k / bk))
    for x in range(e):
        for i in range(scale.shape[1]):
            for j in range(scale.shape[2]):
                part = w[x, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]  # partial at the edges
                s = hand_scale(part)
                assert scale[x, i, j] == s, (x, i, j)
                got = q[x, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                assert torch.equal(bits(got), bits(hand_quantize(part, s)))
                if part.abs().max() > 0:  # the largest element lands on the format's max
                    assert got.float().abs().max() == 448.0
    assert scale[0, 0, 0] == torch.tensor(1e-10) / 448 and not q[0, :bn, :bk].float().any()


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_channel_and_tensor_quantization_match_hand_computation(scheme):
    w = torch.randn(3, 40, 24) * torch.rand(3, 40, 1) * 10
    config = QuantConfig.fp8_channel() if scheme == "channel" else QuantConfig.fp8_tensor()
    q, scale = quantize_weight(w, config)
    for x in range(3):
        if scheme == "tensor":
            s = hand_scale(w[x])
            assert scale[x] == s
            assert torch.equal(bits(q[x]), bits(hand_quantize(w[x], s)))
            continue
        for r in range(40):
            s = hand_scale(w[x, r])
            assert scale[x, r] == s
            assert torch.equal(bits(q[x, r]), bits(hand_quantize(w[x, r], s)))


def test_reference_quantize_fp8_follows_the_contract():
    x = torch.randn(6, 300).bfloat16() * 5
    q, s = reference.quantize_fp8(x, 128)
    assert s.shape == (6, 3) and q.dtype == FP8
    for r in range(6):
        for g in range(3):
            part = x[r, g * 128:(g + 1) * 128]
            assert s[r, g] == hand_scale(part)
            assert torch.equal(bits(q[r, g * 128:(g + 1) * 128]),
                               bits(hand_quantize(part, hand_scale(part))))
    assert torch.equal(reference.quantize_fp8(x, 0)[1][:, 0], torch.stack([hand_scale(r)
                                                                           for r in x]))
    assert reference.quantize_fp8(x, -1)[1].reshape(()) == hand_scale(x)
    # Static: the given scale, returned as [1, 1]; values beyond it saturate at 448.
    small = torch.tensor([0.001])
    q, s = reference.quantize_fp8(x, 0, small)
    assert s.shape == (1, 1) and s.item() == pytest.approx(0.001)
    assert torch.equal(q.float().abs().amax(), torch.tensor(448.0))
    assert torch.equal(bits(q), bits(hand_quantize(x, small.reshape(()))))


# --- checkpoint quantization_config --------------------------------------------------

DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "weight_block_size": [128, 128]}
QWEN3_FP8 = {"activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"],
             "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
AUTOFP8_STATIC = {"activation_scheme": "static", "ignored_layers": ["lm_head"],
                  "quant_method": "fp8"}


def compressed_tensors(weights, input_activations):
    return {
        "config_groups": {"group_0": {"input_activations": input_activations,
                                      "output_activations": None, "targets": ["Linear"],
                                      "weights": weights}},
        "format": "float-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
    }


def ct_weights(strategy, **extra):
    return {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
            "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": strategy,
            "symmetric": True, "type": "float", **extra}


def ct_activations(strategy, dynamic=True, **extra):
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None,
            "num_bits": 8, "observer": None if dynamic else "minmax", "observer_kwargs": {},
            "strategy": strategy, "symmetric": True, "type": "float", **extra}


CONFIGS = {
    "deepseek_v3": (DEEPSEEK_V3, QuantConfig("block", (128, 128), "dynamic", False)),
    "qwen3_fp8": (QWEN3_FP8, QuantConfig("block", (128, 128), "dynamic", False)),
    "autofp8_static": (AUTOFP8_STATIC, QuantConfig("tensor", None, "static", False)),
    "fp8_dynamic_tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic"},
                           QuantConfig("tensor", None, "dynamic", False)),
    "ct_channel_token": (compressed_tensors(ct_weights("channel"), ct_activations("token")),
                         QuantConfig("channel", None, "dynamic", True)),
    "ct_channel_static": (compressed_tensors(ct_weights("channel"),
                                             ct_activations("tensor", dynamic=False)),
                          QuantConfig("channel", None, "static", False)),
    "ct_tensor_static": (compressed_tensors(ct_weights("tensor"),
                                            ct_activations("tensor", dynamic=False)),
                         QuantConfig("tensor", None, "static", False)),
    "ct_tensor_dynamic": (compressed_tensors(ct_weights("tensor"), ct_activations("tensor")),
                          QuantConfig("tensor", None, "dynamic", False)),
    "ct_block": (compressed_tensors(ct_weights("block", block_structure=[128, 64]),
                                    ct_activations("group", group_size=64)),
                 QuantConfig("block", (128, 64), "dynamic", False)),
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                    "modules_to_not_convert": ["lm_head"]},
                   QuantConfig("channel", None, "dynamic", True)),
    "modelopt_fp8": ({"quant_method": "modelopt", "quant_algo": "FP8"},
                     QuantConfig("tensor", None, "static", False)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_from_checkpoint(name):
    config, expected = CONFIGS[name]
    assert QuantConfig.from_checkpoint(config) == expected
    assert as_quant_config(config) == expected


NOT_SUPPORTED = [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
     r"desc_act=True .*g_idx"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"gptq bits=8 is not supported"),
    ({"quant_method": "awq", "bits": 3}, r"awq bits=3 is not supported"),
    ({"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes' is not supported yet"),
    ({**DEEPSEEK_V3, "fmt": "e5m2"}, r"fmt='e5m2': only the e4m3"),
    (compressed_tensors(ct_weights("group", group_size=128, type="int", num_bits=4), None),
     r"int4 weights in format 'float-quantized' are not supported"),
    (compressed_tensors(ct_weights("group", group_size=128, type="int", num_bits=8), None),
     r"type='int' num_bits=8 is not supported yet"),
    (compressed_tensors(ct_weights("channel"), None), r"weight-only FP8 is not supported yet"),
    (compressed_tensors(ct_weights("group", group_size=128), ct_activations("token")),
     r"strategy='group' is not supported yet"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, r"quant_algo='NVFP4' is not "
                                                          r"supported yet"),
]


@pytest.mark.parametrize("config,message", NOT_SUPPORTED)
def test_unsupported_checkpoints_raise_not_implemented(config, message):
    with pytest.raises(NotImplementedError, match=message):
        QuantConfig.from_checkpoint(config)


INVALID = [
    ({**DEEPSEEK_V3, "activation_scheme": "static"}, r"weight_block_size=\[128, 128\] with "
                                                     r"activation_scheme='static'"),
    ({**DEEPSEEK_V3, "activation_scheme": "weird"}, r"activation_scheme='weird', expected"),
    ({**DEEPSEEK_V3, "weight_block_size": [128]}, r"weight_block_size=\[128\], expected \[bn, "
                                                  r"bk\]"),
    (compressed_tensors(ct_weights("channel"), ct_activations("token", dynamic=False)),
     r"strategy='token' with dynamic=False, expected one of \('tensor',\)"),
    (compressed_tensors(ct_weights("block", block_structure=[128, 128]),
                        ct_activations("tensor", dynamic=False)), r"static input_activations"),
    ({"quant_method": "compressed-tensors"}, r"compressed-tensors needs config_groups"),
]


@pytest.mark.parametrize("config,message", INVALID)
def test_invalid_checkpoint_configs_raise(config, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_checkpoint(config)


def test_several_config_groups_of_one_scheme_are_one():
    config = compressed_tensors(ct_weights("channel"), ct_activations("token"))
    config["config_groups"]["group_1"] = dict(config["config_groups"]["group_0"],
                                              targets=["re:.*experts.*"])
    assert QuantConfig.from_checkpoint(config) == QuantConfig.fp8_channel()
    config["config_groups"]["group_1"]["weights"] = ct_weights("tensor")
    with pytest.raises(NotImplementedError, match="different schemes"):
        QuantConfig.from_checkpoint(config)


def test_as_quant_config_rejects_other_values():
    with pytest.raises(ValueError, match=r"quant_config must be None, a QuantConfig, a "
                                         r"checkpoint's quantization_config dict or one of"):
        as_quant_config("int4")
    with pytest.raises(ValueError, match=r"quantization_config must be a dict, got list"):
        QuantConfig.from_checkpoint([1])
