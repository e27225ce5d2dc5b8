"""FP8 FusedMoE: checkpoints written in DeepSeek-V3 (block), compressed-tensors
(channel) and AutoFP8 (tensor, static) names and dtypes load through
load_weights, stay fp8 in memory, shard exactly under TP (the I/tp = 192
split of Qwen3-FP8 at tp 4 included) and EP, quantize bf16 checkpoints
online, and run against the float64 reference emulating each scheme."""

import math

import pytest
import torch

from fused_moe import reference
from fused_moe.layer import FusedMoE
from fused_moe.weights import iterate_safetensors, load_weights, make_expert_params_mapping

safetensors_torch = pytest.importorskip("safetensors.torch")

FP8 = torch.float8_e4m3fn
E, K, H, I = 8, 2, 320, 256  # H: two whole 128-blocks and a partial one
M = 23
PREFIX = "model.layers.0.mlp.experts"
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "weight_block_size": [128, 128]}
COMPRESSED_CHANNEL = {
    "config_groups": {"group_0": {
        "input_activations": {"dynamic": True, "num_bits": 8, "strategy": "token",
                              "symmetric": True, "type": "float"},
        "targets": ["Linear"],
        "weights": {"dynamic": False, "num_bits": 8, "strategy": "channel", "symmetric": True,
                    "type": "float"}}},
    "format": "float-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors"}
AUTOFP8_STATIC = {"activation_scheme": "static", "ignored_layers": ["lm_head"],
                  "quant_method": "fp8"}
TOLERANCE = 3.5e-2  # the layer against the float64 emulation of its scheme
FP8_LOSS = 0.1  # the quantized model against the unquantized one


def check(out, emulation, bf16_model, label):
    """The layer against its scheme's emulation (tight) and the unquantized model (loose)."""
    err, loss = rel_err(out, emulation), rel_err(out, bf16_model)
    print(f"{label}: relative error {err:.2e} against the emulation, {loss:.2e} against the "
          "bf16 model")
    assert err <= TOLERANCE, f"{label}: {err:.3e} against the emulation"
    assert loss <= FP8_LOSS, f"{label}: {loss:.3e} against the unquantized model"


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not out.isnan().any()
    return ((out - ref).norm() / ref.norm()).item()


# --- checkpoints, quantized by hand -------------------------------------------------


def float_experts(inter=I, hidden=H):
    """gate, up [E, I, H] and down [E, H, I] in fp32, O(1) outputs."""
    return (torch.randn(E, inter, hidden) / hidden**0.5, torch.randn(E, inter, hidden) /
            hidden**0.5, torch.randn(E, hidden, inter) / inter**0.5)


def hand_scale(values):
    return torch.clamp(values.abs().max().float(), min=1e-10) / 448.0


def block_quantize(w, block=(128, 128)):
    """One [N, K] weight -> fp8 and its [ceil(N/bn), ceil(K/bk)] scales, block by block."""
    bn, bk = block
    n, k = w.shape
    scale = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            scale[i, j] = hand_scale(part)
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (part / scale[i, j]).clamp(-448, 448)
    return q, scale


def channel_quantize(w):
    scale = torch.stack([hand_scale(row) for row in w])
    return (w / scale[:, None]).clamp(-448, 448).to(FP8), scale


def tensor_quantize(w):
    scale = hand_scale(w)
    return (w / scale).clamp(-448, 448).to(FP8), scale


def deepseek_checkpoint(gate, up, down):
    """DeepSeek-V3's names and dtypes: fp8 weights, fp32 weight_scale_inv per
    128 x 128 block. Returns the tensors and the whole layer (fp8 w13, w2 and
    their block scales, gate then up) for the reference."""
    tensors, layer = {}, {"w13": [], "w2": [], "w13_scale": [], "w2_scale": []}
    for e in range(E):
        parts = {}
        for name, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            parts[name] = block_quantize(w)
            tensors[f"{PREFIX}.{e}.{name}.weight"] = parts[name][0]
            tensors[f"{PREFIX}.{e}.{name}.weight_scale_inv"] = parts[name][1]
        layer["w13"].append(torch.cat([parts["gate_proj"][0], parts["up_proj"][0]]))
        layer["w13_scale"].append(torch.cat([parts["gate_proj"][1], parts["up_proj"][1]]))
        layer["w2"].append(parts["down_proj"][0])
        layer["w2_scale"].append(parts["down_proj"][1])
    return tensors, {k: torch.stack(v) for k, v in layer.items()}


def compressed_channel_checkpoint(gate, up, down):
    """compressed-tensors (Llama-4, Qwen3 FP8-dynamic): fp8 weights, bf16
    weight_scale [out, 1]."""
    tensors, layer = {}, {"w13": [], "w2": [], "w13_scale": [], "w2_scale": []}
    for e in range(E):
        parts = {}
        for name, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            q, s = channel_quantize(w)
            s = s.bfloat16()  # as these checkpoints store them
            parts[name] = (q, s.float())
            tensors[f"{PREFIX}.{e}.{name}.weight"] = q
            tensors[f"{PREFIX}.{e}.{name}.weight_scale"] = s[:, None]
        layer["w13"].append(torch.cat([parts["gate_proj"][0], parts["up_proj"][0]]))
        layer["w13_scale"].append(torch.cat([parts["gate_proj"][1], parts["up_proj"][1]]))
        layer["w2"].append(parts["down_proj"][0])
        layer["w2_scale"].append(parts["down_proj"][1])
    return tensors, {k: torch.stack(v) for k, v in layer.items()}


def autofp8_checkpoint(gate, up, down, prefix="model.layers.0.block_sparse_moe.experts"):
    """AutoFP8 Mixtral: w1/w2/w3 fp8 with a scalar weight_scale each and a
    static input_scale (w1's and w3's the same, as AutoFP8 calibrates them on
    one input). The reference's w13 scale is per row: gate rows w1's, up rows w3's."""
    tensors, layer = {}, {"w13": [], "w2": [], "w13_scale": [], "w2_scale": []}
    input13 = torch.rand(E) * 0.01 + 0.005
    input2 = torch.rand(E) * 0.01 + 0.005
    for e in range(E):
        parts = {}
        for name, w in (("w1", gate[e]), ("w3", up[e]), ("w2", down[e])):
            parts[name] = tensor_quantize(w)
            tensors[f"{prefix}.{e}.{name}.weight"] = parts[name][0]
            tensors[f"{prefix}.{e}.{name}.weight_scale"] = parts[name][1]
            tensors[f"{prefix}.{e}.{name}.input_scale"] = (input2[e] if name == "w2"
                                                           else input13[e]).clone()
        layer["w13"].append(torch.cat([parts["w1"][0], parts["w3"][0]]))
        layer["w13_scale"].append(torch.cat([parts["w1"][1].expand(gate.shape[1]),
                                             parts["w3"][1].expand(up.shape[1])]))
        layer["w2"].append(parts["w2"][0])
        layer["w2_scale"].append(parts["w2"][1])
    out = {k: torch.stack(v) for k, v in layer.items()}
    out["a13_scale"], out["a2_scale"] = input13.max().reshape(1), input2.max().reshape(1)
    return tensors, out


def write(tmp_path, tensors):
    names = sorted(tensors)
    for i in range(2):
        part = {n: tensors[n].contiguous() for n in names[i::2]}
        safetensors_torch.save_file(part, str(tmp_path / f"model-{i}.safetensors"))


def model_of(layer, path=PREFIX):
    """A module holding ``layer`` at ``path``, as a model holds its experts."""
    root = torch.nn.Module()
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        if not hasattr(module, name):
            module.add_module(name, torch.nn.Module())
        module = getattr(module, name)
    module.add_module(leaf, layer)
    return root


def load(tmp_path, quant_config, path=PREFIX, **kwargs):
    layer = FusedMoE(E, K, H, kwargs.pop("intermediate_size", I), params_dtype=torch.bfloat16,
                     quant_config=quant_config, prefix=path, **kwargs)
    load_weights(model_of(layer, path), iterate_safetensors(tmp_path))
    return layer


def emulated(full, x, logits, **scheme):
    weights, ids = reference.fused_topk(logits, K)
    return reference.fused_experts(x, full["w13"], full["w2"], weights, ids,
                                   w13_scale=full["w13_scale"], w2_scale=full["w2_scale"],
                                   a13_scale=full.get("a13_scale"),
                                   a2_scale=full.get("a2_scale"), **scheme)


def unquantized(gate, up, down, x, logits):
    """The bf16 model the checkpoint was quantized from."""
    weights, ids = reference.fused_topk(logits, K)
    return reference.fused_experts(x, torch.cat([gate, up], 1).bfloat16(), down.bfloat16(),
                                   weights, ids, intermediate_dtype=torch.bfloat16)


def tokens():
    return torch.randn(M, H).bfloat16(), torch.randn(M, E)


def fp8_bytes(layer):
    """Bytes of the layer's parameters and buffers: fp8 weights plus fp32 scales."""
    tensors = list(layer.parameters()) + [b for b in layer.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def dequantized(layer):
    """The layer's w13, w2 in float64, from its parameters (kernel-form scales)."""
    layer.process_weights_after_loading()
    s = layer._op_scales
    return (reference.dequantize(layer.w13_weight, s["w13_scale"], layer.block_shape),
            reference.dequantize(layer.w2_weight, s["w2_scale"], layer.block_shape))


def full_dequantized(full, block_shape=None):
    return (reference.dequantize(full["w13"], full["w13_scale"], block_shape),
            reference.dequantize(full["w2"], full["w2_scale"], block_shape))


def rank_rows(inter, tp_size, tp_rank):
    """The w13 rows of a TP rank: its slice of gate, then of up."""
    part = inter // tp_size
    return torch.cat([torch.arange(part) + tp_rank * part,
                      torch.arange(part) + inter + tp_rank * part])


def rank_slice(w13, w2, tp_size, tp_rank):
    """The part of the whole layer's w13, w2 a TP rank holds."""
    part = w2.shape[2] // tp_size
    return (w13[:, rank_rows(w2.shape[2], tp_size, tp_rank)],
            w2[:, :, tp_rank * part:(tp_rank + 1) * part])


def emulated_ranks(full, tp_size, x, logits, **scheme):
    """The sum of every TP rank's emulation, for per-row (channel or tensor)
    scales: each rank quantizes its own part of the intermediate."""
    total = 0
    for r in range(tp_size):
        w13, w2 = rank_slice(full["w13"], full["w2"], tp_size, r)
        scale13 = full["w13_scale"][:, rank_rows(full["w2"].shape[2], tp_size, r)]
        total = total + emulated(dict(full, w13=w13, w2=w2, w13_scale=scale13), x, logits,
                                 **scheme)
    return total


# --- DeepSeek-V3 block scales ----------------------------------------------------------


def test_deepseek_v3_checkpoint_loads_fp8_and_matches_reference(tmp_path):
    gate, up, down = float_experts()
    tensors, full = deepseek_checkpoint(gate, up, down)
    write(tmp_path, tensors)
    layer = load(tmp_path, DEEPSEEK_V3)
    assert layer.w13_weight.dtype == FP8 and layer.w2_weight.dtype == FP8
    assert layer.block_shape == (128, 128)
    assert layer.w13_weight_scale_inv.shape == (E, 4, 3)
    assert layer.w2_weight_scale_inv.shape == (E, 3, 2)
    # Memory: the checkpoint's bytes, no bf16 copy of the weights.
    assert fp8_bytes(layer) == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.equal(layer.w13_weight.view(torch.uint8), full["w13"].view(torch.uint8))
    assert torch.equal(layer.w13_weight_scale_inv, full["w13_scale"])
    x, logits = tokens()
    out = layer(x, logits)
    assert out.dtype == torch.bfloat16
    check(out, emulated(full, x, logits, block_shape=(128, 128)),
          unquantized(gate, up, down, x, logits), "DeepSeek-V3 block")


def test_vllm_style_loop_over_the_mapping_loads_block_scales():
    """A model's own loop, as vLLM's DeepSeek-V2/V3 write it: the mapping's
    weight_name replaced by param_name, weight_scale_inv included."""
    gate, up, down = float_experts()
    tensors, full = deepseek_checkpoint(gate, up, down)
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=DEEPSEEK_V3,
                     ep_size=2, ep_rank=1)
    params = dict(model_of(layer, "mlp.experts").named_parameters())
    mapping = FusedMoE.make_expert_params_mapping(None, "gate_proj", "down_proj", "up_proj", E)
    loaded = 0
    for name, tensor in tensors.items():
        name = name.replace("model.layers.0.", "")
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name in name:
                param = params[name.replace(weight_name, param_name)]
                loaded += param.weight_loader(param, tensor, name, shard_id=shard_id,
                                              expert_id=expert_id, return_success=True)
                break
    assert loaded == layer.local_num_experts * 6
    w13, w2 = dequantized(layer)
    full13, full2 = full_dequantized(full, (128, 128))
    assert torch.equal(w13, full13[4:]) and torch.equal(w2, full2[4:])


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_shards_hold_exactly_their_part_and_sum_to_the_layer(tp_size, tmp_path):
    gate, up, down = float_experts()
    tensors, full = deepseek_checkpoint(gate, up, down)
    write(tmp_path, tensors)
    full13, full2 = full_dequantized(full, (128, 128))
    x, logits = tokens()
    ranks = [load(tmp_path, DEEPSEEK_V3, tp_size=tp_size, tp_rank=r) for r in range(tp_size)]
    inter = I // tp_size
    fine = (128, 128) if inter % 128 == 0 else (64, 64)
    for r, layer in enumerate(ranks):
        assert layer.block_shape == fine
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, tp_size, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2), f"rank {r}"
    total = sum(layer(x, logits).double() for layer in ranks)
    if fine == (128, 128):
        # The same quantization groups as the whole layer: only rounding differs.
        assert rel_err(total, load(tmp_path, DEEPSEEK_V3)(x, logits)) <= 1e-2
    assert rel_err(total, emulated(refined(full, fine), x, logits, block_shape=fine)) <= TOLERANCE


def refined(full, fine, block=(128, 128)):
    """The whole layer's block scales on a finer grid (copies: the same weights)."""
    out = dict(full)
    for name, w in (("w13_scale", full["w13"]), ("w2_scale", full["w2"])):
        s = full[name]
        s = s.repeat_interleave(block[0] // fine[0], 1)[:, :math.ceil(w.shape[1] / fine[0])]
        out[name] = s.repeat_interleave(block[1] // fine[1], 2)[:, :, :math.ceil(w.shape[2] /
                                                                                fine[1])]
    return out


def test_qwen3_192_columns_per_rank_split_the_blocks_exactly(tmp_path):
    """Qwen3-30B-A3B-FP8 at tp 4: I = 768, 192 columns per rank, 128-blocks:
    ranks 1 and 3 start inside a checkpoint block. The ranks' grid is (64, 64)
    and each of their blocks carries the scale of the checkpoint block holding it."""
    inter, tp_size = 768, 4
    gate, up, down = float_experts(inter)
    tensors, full = deepseek_checkpoint(gate, up, down)
    write(tmp_path, tensors)
    full13, full2 = full_dequantized(full, (128, 128))
    x, logits = tokens()
    total = 0
    for r in range(tp_size):
        layer = load(tmp_path, DEEPSEEK_V3, intermediate_size=inter, tp_size=tp_size, tp_rank=r)
        assert layer.block_shape == (64, 64)
        assert layer.w13_weight_scale_inv.shape == (E, 6, 5)
        assert layer.w2_weight_scale_inv.shape == (E, 5, 3)
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, tp_size, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2), f"rank {r}"
        # Rank 1's first 64 gate rows are the end of checkpoint block 1.
        if r == 1:
            assert torch.equal(layer.w13_weight_scale_inv[:, 0, 0], full["w13_scale"][:, 1, 0])
        total = total + layer(x, logits).double()
    assert rel_err(total, emulated(refined(full, (64, 64)), x, logits,
                                   block_shape=(64, 64))) <= TOLERANCE


@pytest.mark.parametrize("ep_size,redundant,strategy", [(2, 0, "linear"), (3, 0, "round_robin"),
                                                        (2, 2, "linear")])
def test_ep_places_scales_with_their_experts(ep_size, redundant, strategy, tmp_path):
    gate, up, down = float_experts()
    tensors, full = deepseek_checkpoint(gate, up, down)
    write(tmp_path, tensors)
    full13, full2 = full_dequantized(full, (128, 128))
    x, logits = tokens()
    total = 0
    for r in range(ep_size):
        layer = load(tmp_path, DEEPSEEK_V3, ep_size=ep_size, ep_rank=r,
                     expert_placement_strategy=strategy, enable_eplb=redundant > 0,
                     num_redundant_experts=redundant)
        assert layer.expert_map is not None
        logical = layer.local_logical_experts
        w13, w2 = dequantized(layer)
        assert torch.equal(w13, full13[logical]) and torch.equal(w2, full2[logical])
        total = total + layer(x, logits).double()
    assert rel_err(total, emulated(full, x, logits, block_shape=(128, 128))) <= TOLERANCE


def test_fused_whole_layer_tensors_and_combined_w13_scales():
    """The layer's own unsharded state dict: fused [E, 2I, H] fp8 tensors and
    combined gate/up block scales, loaded by TP ranks."""
    gate, up, down = float_experts()
    _, full = deepseek_checkpoint(gate, up, down)
    checkpoint = {"w13_weight": full["w13"], "w2_weight": full["w2"],
                  "w13_weight_scale_inv": full["w13_scale"],
                  "w2_weight_scale_inv": full["w2_scale"]}
    full13, full2 = full_dequantized(full, (128, 128))
    for r in range(2):
        layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="fp8",
                         tp_size=2, tp_rank=r)
        assert layer.load_weights(checkpoint.items()) == set(checkpoint)
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, 2, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2)
        # One expert's combined w13 scale through weight_loader, shard_id "w13".
        layer.w13_weight_scale_inv.data.fill_(0)
        layer.weight_loader(layer.w13_weight_scale_inv, full["w13_scale"][3], "e.3.w13", "w13", 3)
        rows = [r, 2 + r]  # gate block r, up block r
        assert torch.equal(layer.w13_weight_scale_inv[3], full["w13_scale"][3, rows])
        assert not layer.w13_weight_scale_inv[2].any()


# --- compressed-tensors channel, AutoFP8 tensor --------------------------------------------


@pytest.mark.parametrize("tp_size", [1, 2])
def test_compressed_tensors_channel_checkpoint(tp_size, tmp_path):
    gate, up, down = float_experts()
    tensors, full = compressed_channel_checkpoint(gate, up, down)
    write(tmp_path, tensors)
    full13, full2 = full_dequantized(full)
    x, logits = tokens()
    total = 0
    for r in range(tp_size):
        layer = load(tmp_path, COMPRESSED_CHANNEL, tp_size=tp_size, tp_rank=r)
        assert layer.w13_weight.dtype == FP8
        assert layer.w13_weight_scale.shape == (E, 2 * I // tp_size, 1)
        assert layer.w2_weight_scale.shape == (E, H, 1)
        assert layer._op_scales["w13_scale"].shape == (E, 2 * I // tp_size)
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, tp_size, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2)
        total = total + layer(x, logits).double()
    check(total, emulated_ranks(full, tp_size, x, logits, per_act_token_quant=True),
          unquantized(gate, up, down, x, logits), f"compressed-tensors channel, tp {tp_size}")


@pytest.mark.parametrize("tp_size", [1, 2])
def test_autofp8_static_tensor_checkpoint(tp_size, tmp_path):
    gate, up, down = float_experts()
    path = "model.layers.0.block_sparse_moe.experts"
    tensors, full = autofp8_checkpoint(gate, up, down, path)
    write(tmp_path, tensors)
    full13, full2 = full_dequantized(full)
    x, logits = tokens()
    x = x * 0.5  # the static scales (at most 0.015 * 448) cover these activations
    total = 0
    for r in range(tp_size):
        layer = load(tmp_path, AUTOFP8_STATIC, path=path, tp_size=tp_size, tp_rank=r)
        assert layer.w13_weight_scale.shape == (E, 2) and layer.w2_weight_scale.shape == (E,)
        assert layer.w13_input_scale.shape == (E,)
        s = layer._op_scales
        # Per half, never requantized: gate rows carry w1's scale, up rows w3's.
        assert s["w13_scale"].shape == (E, 2 * I // tp_size)
        half = I // tp_size
        assert torch.equal(s["w13_scale"], layer.w13_weight_scale.repeat_interleave(half, 1))
        assert torch.equal(layer.w13_weight_scale[5], torch.stack(
            [tensors[f"{path}.5.{w}.weight_scale"] for w in ("w1", "w3")]))
        assert torch.equal(s["a13_scale"], full["a13_scale"])
        assert torch.equal(s["a2_scale"], full["a2_scale"])
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, tp_size, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2)
        total = total + layer(x, logits).double()
    check(total, emulated_ranks(full, tp_size, x, logits),
          unquantized(gate, up, down, x, logits), f"AutoFP8 static tensor, tp {tp_size}")


# --- online quantization -----------------------------------------------------------------


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_bf16_checkpoint_is_quantized_as_it_loads(scheme, tp_size, tmp_path):
    gate, up, down = (t.bfloat16() for t in float_experts())
    tensors = {}
    for e in range(E):
        for name, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            tensors[f"{PREFIX}.{e}.{name}.weight"] = w
    write(tmp_path, tensors)
    quantize = block_quantize if scheme == "fp8" else channel_quantize
    full = {"w13": [], "w2": [], "w13_scale": [], "w2_scale": []}
    for e in range(E):  # each checkpoint tensor quantized whole, by hand
        (gq, gs), (uq, us), (dq, ds) = (quantize(t[e].float()) for t in (gate, up, down))
        full["w13"].append(torch.cat([gq, uq]))
        full["w13_scale"].append(torch.cat([gs, us]))
        full["w2"].append(dq)
        full["w2_scale"].append(ds)
    full = {k: torch.stack(v) for k, v in full.items()}
    block = (128, 128) if scheme == "fp8" else None
    full13, full2 = full_dequantized(full, block)
    x, logits = tokens()
    total = 0
    for r in range(tp_size):
        layer = load(tmp_path, scheme, tp_size=tp_size, tp_rank=r)
        assert layer.w13_weight.dtype == FP8 and layer.w2_weight.dtype == FP8
        assert all(p.dtype in (FP8, torch.float32) for p in layer.parameters())
        w13, w2 = dequantized(layer)
        want13, want2 = rank_slice(full13, full2, tp_size, r)
        assert torch.equal(w13, want13) and torch.equal(w2, want2)
        total = total + layer(x, logits).double()
    emulation = emulated(full, x, logits, block_shape=block) if block else \
        emulated_ranks(full, tp_size, x, logits, per_act_token_quant=True)
    check(total, emulation, unquantized(gate.float(), up.float(), down.float(), x, logits),
          f"online {scheme}, tp {tp_size}")


# --- after loading --------------------------------------------------------------------------


def test_kernel_scales_are_made_once_and_again_after_loading():
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=AUTOFP8_STATIC)
    layer.w13_input_scale.data.copy_(torch.rand(E) + 0.1)
    layer.w2_input_scale.data.copy_(torch.rand(E) + 0.1)
    layer.w13_weight_scale.data.copy_(torch.rand(E, 2))
    layer.process_weights_after_loading()
    first = layer._op_scales
    assert torch.equal(first["a13_scale"], layer.w13_input_scale.max().reshape(1))
    assert torch.equal(first["w13_scale"][:, :I], layer.w13_weight_scale[:, :1].expand(E, I))
    assert torch.equal(first["w13_scale"][:, I:], layer.w13_weight_scale[:, 1:].expand(E, I))
    layer.weight_loader(layer.w2_input_scale, torch.tensor(9.0), "e.0.w2.input_scale", "w2", 0)
    assert layer._op_scales is None  # loading makes them stale
    layer.process_weights_after_loading()
    assert layer._op_scales["a2_scale"].item() == 9.0


def test_static_scheme_without_input_scales_raises():
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=AUTOFP8_STATIC)
    layer.w13_input_scale.data[:5] = 1.0
    layer.w2_input_scale.data[:] = 1.0
    with pytest.raises(ValueError, match=r"w13_input_scale of local experts \[5, 6, 7\] is not "
                                         r"loaded"):
        layer.process_weights_after_loading()


def test_dynamic_layer_skips_input_scales():
    layer = FusedMoE(E, K, H, I, quant_config="fp8-channel", prefix="experts")
    assert layer.w13_input_scale is None
    assert layer.load_weights([("experts.0.w1.input_scale", torch.tensor(0.1))]) == set()


# --- bad inputs -------------------------------------------------------------------------------


@pytest.fixture
def block_layer():
    return FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="fp8")


@pytest.mark.parametrize("param_name,tensor,shard_id,message", [
    ("w13_weight_scale_inv", torch.rand(3, 3), "w1",
     r"e.0.w1.weight_scale_inv \(shard_id='w1'\) has shape \[3, 3\], expected \[2, 3\]"),
    ("w2_weight_scale_inv", torch.rand(3, 3), "w2", r"has shape \[3, 3\], expected \[3, 2\]"),
    ("w13_weight_scale_inv", torch.ones(2, 3, dtype=torch.int32), "w1",
     r"e.0.w1.weight_scale_inv for w13_weight_scale_inv has dtype torch.int32, expected a "
     r"float scale"),
    ("w13_weight_scale_inv", torch.ones(2, 3).to(FP8), "w1", r"has dtype torch.float8_e4m3fn, "
                                                             r"expected a float scale"),
    ("w13_weight", torch.ones(I, H).to(torch.float8_e5m2), "w1",
     r"has dtype torch.float8_e5m2, expected torch.float8_e4m3fn"),
    ("w13_weight", torch.ones(I, H, dtype=torch.int8), "w1", r"has dtype torch.int8"),
])
def test_weight_loader_rejects_bad_tensors(block_layer, param_name, tensor, shard_id, message):
    name = {"w13_weight_scale_inv": "e.0.w1.weight_scale_inv",
            "w2_weight_scale_inv": "e.0.w2.weight_scale_inv",
            "w13_weight": "e.0.w1.weight"}[param_name]
    with pytest.raises(ValueError, match=message):
        block_layer.weight_loader(getattr(block_layer, param_name), tensor, name, shard_id, 0)


def test_wrong_scheme_scales_and_fp8_into_an_unquantized_layer():
    channel = FusedMoE(E, K, H, I, quant_config="fp8-channel", prefix="experts")
    with pytest.raises(ValueError, match=r"experts.0.w1.weight_scale_inv: the layer has no "
                                         r"w13_weight_scale_inv: expected a quant_config"):
        channel.load_weights([("experts.0.w1.weight_scale_inv", torch.rand(2, 3))])
    with pytest.raises(ValueError, match=r"weight_scale \(shard_id='w1'\) has shape \[7\], "
                                         r"expected \[256, 1\]"):
        channel.load_weights([("experts.0.w1.weight_scale", torch.rand(7))])
    plain = FusedMoE(E, K, H, I, prefix="experts")
    with pytest.raises(ValueError, match=r"has dtype torch.float8_e4m3fn: an fp8 checkpoint "
                                         r"needs FusedMoE\(quant_config=...\)"):
        plain.load_weights([("experts.0.w1.weight", torch.ones(I, H).to(FP8))])
    with pytest.raises(ValueError, match=r"the layer has no w13_weight_scale"):
        plain.load_weights([("experts.0.w1.weight_scale", torch.rand(I, 1))])


def test_interleaved_gate_up_block_scales_need_the_fused_tensor():
    layer = FusedMoE(E, K, H, I, quant_config="fp8", activation="swigluoai")
    with pytest.raises(ValueError, match=r"do not fall on this rank's blocks"):
        layer.weight_loader(layer.w13_weight_scale_inv, torch.rand(2, 3), "e.0.w1", "w1", 0)


def test_bad_quant_config_names_it():
    with pytest.raises(ValueError, match=r"quant_config must be None, a QuantConfig"):
        FusedMoE(E, K, H, I, quant_config="int8")
    with pytest.raises(NotImplementedError, match=r"quant_method='bitsandbytes' is not supported"):
        FusedMoE(E, K, H, I, quant_config={"quant_method": "bitsandbytes"})


def test_mapping_names_are_vllms():
    mapping = make_expert_params_mapping("gate_proj", "down_proj", "up_proj", 1)
    name = "mlp.experts.0.gate_proj.weight_scale_inv"
    (param_name, weight_name, _, _), = [m for m in mapping if m[1] in name]
    assert name.replace(weight_name, param_name) == "mlp.experts.w13_weight_scale_inv"


# --- the reference's FP8 GEMM ------------------------------------------------------------


def test_reference_grouped_gemm_dequantizes_both_operands():
    a = torch.randn(9, 200)
    w = torch.randn(3, 70, 200)
    offsets = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    qw = torch.stack([block_quantize(w[e], (32, 64))[0] for e in range(3)])
    sw = torch.stack([block_quantize(w[e], (32, 64))[1] for e in range(3)])
    qa, sa = reference.quantize_fp8(a, 64)
    out = reference.grouped_gemm(qa, qw, offsets, a_scale=sa, w_scale=sw, block_shape=(32, 64))
    # By hand: every element times the scale of its block.
    a_hand = qa.double() * sa.double().repeat_interleave(64, 1)[:, :200]
    w_hand = qw.double() * sw.double().repeat_interleave(32, 1)[:, :70].repeat_interleave(64, 2)[
        :, :, :200]
    expected = torch.cat([a_hand[:4] @ w_hand[0].T, a_hand[4:] @ w_hand[2].T])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert rel_err(out, reference.grouped_gemm(a, w, offsets)) <= 0.1
    # Per channel weights and per-row activations.
    qc, sc = zip(*(channel_quantize(w[e]) for e in range(3)))
    qa, sa = reference.quantize_fp8(a, 0)
    out = reference.grouped_gemm(qa, torch.stack(qc), offsets, a_scale=sa, w_scale=torch.stack(sc))
    expected = (qa.double() * sa.double())[4:] @ (torch.stack(qc)[2].double() *
                                                  torch.stack(sc)[2, :, None].double()).T
    torch.testing.assert_close(out[4:], expected, rtol=0, atol=0)


# --- nothing made again per forward -------------------------------------------------------


def channel_layer():
    gate, up, down = float_experts()
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config="fp8-channel")
    layer.load_weights({"w13_weight": torch.cat([gate, up], 1), "w2_weight": down}.items())
    return layer


def test_forward_uses_the_scales_made_after_loading(monkeypatch):
    layer = channel_layer()
    layer.process_weights_after_loading()
    made = layer._op_scales
    monkeypatch.setattr(layer, "process_weights_after_loading",
                        lambda: pytest.fail("scales made again in forward"))
    x, logits = tokens()
    layer(x, logits)
    layer(x, logits)
    assert layer._op_scales is made
    monkeypatch.undo()
    layer.to("cpu")  # moving the layer makes them again, from the moved parameters
    assert layer._op_scales is None
    layer(x, logits)
    assert layer._op_scales is not None


def test_fp8_layer_compiles_into_one_graph():
    layer = channel_layer()
    layer.process_weights_after_loading()
    x, logits = tokens()
    with torch.inference_mode():
        eager = layer(x, logits)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, logits)
    torch.testing.assert_close(compiled, eager)


def test_scales_of_either_checkpoint_shape_load_alike():
    """Channel scales come as [out, 1] or [out], tensor and input scales as
    [] or [1], depending on the tool that wrote the checkpoint."""
    layer = FusedMoE(E, K, H, I, quant_config="fp8-channel")
    s = torch.rand(I)
    layer.weight_loader(layer.w13_weight_scale, s, "e.2.w3.weight_scale", "w3", 2)
    layer.weight_loader(layer.w13_weight_scale, s[:, None].bfloat16(), "e.3.w3.weight_scale",
                        "w3", 3)
    assert torch.equal(layer.w13_weight_scale[2, I:, 0], s)
    assert torch.equal(layer.w13_weight_scale[3, I:, 0], s.bfloat16().float())
    assert torch.equal(layer.w13_weight_scale[2, :I], torch.ones(I, 1))  # w1's rows untouched
    static = FusedMoE(E, K, H, I, quant_config=AUTOFP8_STATIC)
    for e, shape in ((1, ()), (2, (1,))):
        value = torch.rand(shape)
        static.weight_loader(static.w13_weight_scale, value, f"e.{e}.w3.weight_scale", "w3", e)
        static.weight_loader(static.w2_input_scale, value, f"e.{e}.w2.input_scale", "w2", e)
        assert static.w13_weight_scale[e, 1] == value.reshape(())
        assert static.w2_input_scale[e] == value.reshape(())
    # w1's and w3's input scales of one expert: the larger is the expert's.
    static.weight_loader(static.w13_input_scale, torch.tensor(0.5), "e.0.w1.input_scale", "w1", 0)
    static.weight_loader(static.w13_input_scale, torch.tensor(0.2), "e.0.w3.input_scale", "w3", 0)
    assert static.w13_input_scale[0] == 0.5


# --- CUDA -----------------------------------------------------------------------------------


CUDA_CASES = {
    "deepseek_v3": (DEEPSEEK_V3, deepseek_checkpoint, dict(block_shape=(128, 128))),
    "compressed_channel": (COMPRESSED_CHANNEL, compressed_channel_checkpoint,
                           dict(per_act_token_quant=True)),
    "autofp8_static": (AUTOFP8_STATIC, autofp8_checkpoint, {}),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_fp8_layer_runs_without_host_sync(case):
    quant_config, write_checkpoint, scheme = CUDA_CASES[case]
    gate, up, down = float_experts()
    tensors, full = write_checkpoint(gate, up, down)
    path = next(iter(tensors)).rsplit(".", 3)[0]  # the experts' module path
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=quant_config,
                     device="cuda", prefix=path)
    load_weights(model_of(layer, path), tensors.items())
    x, logits = tokens()
    x = x * 0.5  # within the AutoFP8 checkpoint's static scales
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x.cuda(), logits.cuda())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(out.cpu(), emulated(full, x, logits, **scheme), unquantized(gate, up, down, x, logits),
          f"CUDA {case}")
