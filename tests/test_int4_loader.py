"""Loading int4 MoE checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized)
into FusedMoE on the CPU: tiny Qwen3-MoE-shaped checkpoints written here as
safetensors, in each format's own tensor names, dtypes and packing (built by
this file's own packers, not fused_moe.quant's), loaded through load_weights;
then tensor and expert parallel shards of the same checkpoint."""

import pytest
import torch

from fused_moe import FusedMoE, reference
from fused_moe.weights import iterate_safetensors, load_weights
from conftest import rel_err

E, TOP_K, H, I, G = 4, 2, 128, 128, 32  # I / 4 = 32: TP 4 still on the group grid
PREFIX = "model.layers.0.mlp"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i]


# --- the formats, by their definitions -------------------------------------------------


def _int32(words):
    """int64 words of 32 bits -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack8(codes, dim, order=tuple(range(8))):
    """Codes 0..15 -> int32 words, 8 consecutive codes along ``dim`` a word,
    code order[i] of each eight in nibble i."""
    codes = codes.long().movedim(dim, -1)
    codes = codes.reshape(*codes.shape[:-1], -1, 8)
    words = sum(codes[..., order[i]] << (4 * i) for i in range(8))
    return _int32(words).movedim(-1, dim).contiguous()


def quantize_groups(w, symmetric):
    """w [N, K] -> (codes [N, K] 0..15, zero points [N, K/G], fp16 scales [N, K/G])."""
    n, k = w.shape
    groups = w.double().reshape(n, k // G, G)
    if symmetric:
        scale = (groups.abs().amax(-1) / 7).half()
        zero = torch.full(scale.shape, 8, dtype=torch.long)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).half()
        zero = torch.round(-lo / scale.double()).long().clamp(0, 15)
    codes = (torch.round(groups / scale.double()[..., None]) + zero[..., None]).clamp(0, 15)
    return codes.long().reshape(n, k), zero, scale


def dequantized(codes, zero, scale):
    """(codes - zero) * scale, per group of G along K, float64 [N, K]."""
    n, k = codes.shape
    groups = codes.reshape(n, k // G, G) - zero[..., None]
    return (groups * scale.double()[..., None]).reshape(n, k)


def gptq_tensors(w, symmetric):
    """GPTQ (v1): qweight [K/8, N] packed along K, scales [K/G, N], qzeros
    [K/G, N/8] packed along N holding zero - 1, g_idx [K]."""
    codes, zero, scale = quantize_groups(w, symmetric)
    deq = dequantized(codes, zero, scale)
    return {"qweight": _pack8(codes.T, 0), "scales": scale.T.contiguous(),
            "qzeros": _pack8(zero.T - 1, 1), "g_idx": torch.arange(w.shape[1]) // G}, deq


def awq_tensors(w, symmetric):
    """AWQ (GEMM): qweight [K, N/8] and qzeros [K/G, N/8] packed along N in AWQ's order."""
    codes, zero, scale = quantize_groups(w, symmetric)
    deq = dequantized(codes, zero, scale)
    return {"qweight": _pack8(codes.T, 1, AWQ_ORDER), "scales": scale.T.contiguous(),
            "qzeros": _pack8(zero.T, 1, AWQ_ORDER)}, deq


def compressed_tensors(w, symmetric):
    """pack-quantized: weight_packed [N, K/8] of signed values + 8 along K,
    weight_scale [N, K/G], weight_zero_point [N/8, K/G] (signed + 8, along N)
    when asymmetric, weight_shape [N, K]."""
    codes, zero, scale = quantize_groups(w, symmetric)
    signed, zp = codes - 8, zero - 8  # compressed-tensors' quantized range [-8, 7]
    scale = scale.bfloat16()  # its scales keep the model's dtype
    tensors = {"weight_packed": _pack8(signed + 8, 1), "weight_scale": scale,
               "weight_shape": torch.tensor(w.shape)}
    if not symmetric:
        tensors["weight_zero_point"] = _pack8(zp + 8, 0)
    return tensors, dequantized(codes, zero, scale)


FORMATS = {
    "gptq": (gptq_tensors, lambda sym: {"quant_method": "gptq", "bits": 4, "group_size": G,
                                        "sym": sym, "desc_act": False}),
    "awq": (awq_tensors, lambda sym: {"quant_method": "awq", "bits": 4, "group_size": G,
                                      "zero_point": not sym, "version": "gemm"}),
    "compressed-tensors": (compressed_tensors, lambda sym: {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": G,
            "symmetric": sym, "actorder": None}}}}),
}


def write_checkpoint(path, fmt, symmetric, seed=0):
    """A Qwen3-MoE layer's experts and router in ``fmt``; returns the dequantized
    (w13 [E, 2I, H], w2 [E, H, I]) float64 weights and the checkpoint tensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    make, _ = FORMATS[fmt]
    tensors = {f"{PREFIX}.gate.weight": torch.randn(E, H, generator=gen).bfloat16()}
    w13, w2 = [], []
    for e in range(E):
        deq = {}
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = torch.randn(n, k, generator=gen) * k**-0.5
            parts, deq[proj] = make(w, symmetric)
            tensors.update({f"{PREFIX}.experts.{e}.{proj}.{name}": t
                            for name, t in parts.items()})
        w13.append(torch.cat([deq["gate_proj"], deq["up_proj"]]))
        w2.append(deq["down_proj"])
    save_file(tensors, str(path / "model.safetensors"))
    return torch.stack(w13), torch.stack(w2), tensors


class Block(torch.nn.Module):
    def __init__(self, config, **parallel):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False, dtype=torch.bfloat16)
        self.experts = FusedMoE(E, TOP_K, H, I, params_dtype=parallel.pop("dtype", torch.bfloat16),
                                quant_config=config, prefix=f"{PREFIX}.experts", **parallel)


class Model(torch.nn.Module):
    """Just the names: model.layers.0.mlp.{gate, experts}."""

    def __init__(self, config, **parallel):
        super().__init__()
        layer = torch.nn.Module()
        layer.mlp = Block(config, **parallel)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])

    @property
    def experts(self):
        return self.model.layers[0].mlp.experts


def loaded_model(path, fmt, symmetric, **parallel):
    model = Model(FORMATS[fmt][1](symmetric), **parallel)
    loaded = load_weights(model, iterate_safetensors(path))
    return model, loaded


def inputs(m=19, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, H, generator=gen).bfloat16(), torch.randn(m, E, generator=gen)


# --- whole layer ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,symmetric", [("gptq", True), ("gptq", False), ("awq", False),
                                           ("compressed-tensors", True),
                                           ("compressed-tensors", False)])
def test_checkpoint_loads_packed_and_matches_the_reference(tmp_path, fmt, symmetric):
    w13, w2, tensors = write_checkpoint(tmp_path, fmt, symmetric)
    model, loaded = loaded_model(tmp_path, fmt, symmetric)
    layer = model.experts
    assert f"{PREFIX}.experts.w13_weight" in loaded and f"{PREFIX}.gate.weight" in loaded
    # Packed in memory: the checkpoint's bytes of the weights, not bf16's.
    weight_name = "weight_packed" if fmt == "compressed-tensors" else "qweight"
    packed_bytes = sum(t.nbytes for name, t in tensors.items() if name.endswith(weight_name))
    assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.uint8
    assert layer.w13_weight.nbytes + layer.w2_weight.nbytes == packed_bytes
    assert (layer.w13_weight_zero_point is None) == symmetric
    x, logits = inputs()
    tw, ti = layer.route(x, logits)
    ref = reference.fused_experts(x.double(), w13, w2, tw, ti)
    err = rel_err(layer(x, logits), ref)
    assert err <= 3.5e-2, err


def test_permuted_g_idx_is_refused(tmp_path):
    _, _, tensors = write_checkpoint(tmp_path, "gptq", False)
    layer = Model(FORMATS["gptq"][1](False)).experts
    g_idx = tensors[f"{PREFIX}.experts.0.gate_proj.g_idx"]
    with pytest.raises(NotImplementedError, match="g_idx"):
        layer.load_weights([(f"{PREFIX}.experts.0.gate_proj.g_idx", g_idx.flip(0))])


def test_weight_shape_is_checked(tmp_path):
    layer = Model(FORMATS["compressed-tensors"][1](True)).experts
    with pytest.raises(ValueError, match=r"weight_shape = \[128, 64\], expected \[128, 128\]"):
        layer.load_weights([(f"{PREFIX}.experts.1.down_proj.weight_shape",
                             torch.tensor([H, I // 2]))])


def test_named_config_refuses_ambiguous_qzeros(tmp_path):
    """GPTQ's and AWQ's qzeros have one shape: the checkpoint's config tells them apart."""
    _, _, tensors = write_checkpoint(tmp_path, "gptq", False)
    layer = FusedMoE(E, TOP_K, H, I, quant_config="int4-g128-asym", prefix="x")
    name = f"{PREFIX}.experts.0.gate_proj.qzeros"
    with pytest.raises(ValueError, match="qzeros.*packing=None"):
        layer.weight_loader(layer.w13_weight_zero_point, tensors[name], name, "w1", 0)


def test_float_layer_refuses_int4_tensors(tmp_path):
    _, _, tensors = write_checkpoint(tmp_path, "gptq", True)
    layer = FusedMoE(E, TOP_K, H, I, prefix="experts")
    with pytest.raises(ValueError, match="qweight .*int32: a 4-bit checkpoint needs FusedMoE"):
        layer.load_weights([("experts.0.up_proj.qweight",
                             tensors[f"{PREFIX}.experts.0.up_proj.qweight"])])


# --- tensor and expert parallelism --------------------------------------------------------


def _halves(w13, tp):
    """Rank shards [E, 2I/tp, ...] -> (gate, up) concatenated over the ranks."""
    gate = torch.cat([w.chunk(2, dim=1)[0] for w in w13], dim=1)
    up = torch.cat([w.chunk(2, dim=1)[1] for w in w13], dim=1)
    return torch.cat([gate, up], dim=1)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_tensor_parallel_shards_make_the_full_layer(tmp_path, tp, fmt):
    write_checkpoint(tmp_path, fmt, False, seed=tp)
    full = loaded_model(tmp_path, fmt, False, dtype=torch.float32)[0].experts
    ranks = [loaded_model(tmp_path, fmt, False, dtype=torch.float32, tp_size=tp, tp_rank=r,
                          ep_size=1, ep_rank=0)[0].experts for r in range(tp)]
    for name in ("w13_weight", "w13_weight_scale", "w13_weight_zero_point"):
        assert torch.equal(_halves([getattr(r, name) for r in ranks], tp), getattr(full, name))
    for name in ("w2_weight", "w2_weight_scale", "w2_weight_zero_point"):
        assert torch.equal(torch.cat([getattr(r, name) for r in ranks], dim=2),
                           getattr(full, name))
    assert ranks[0].w2_weight.shape == (E, H, I // tp // 2)
    x, logits = inputs(m=13, seed=tp)
    x = x.float()
    total = sum(r(x, logits) for r in ranks)
    assert rel_err(total, full(x, logits)) < 1e-5


def test_expert_parallel_places_the_experts(tmp_path):
    write_checkpoint(tmp_path, "gptq", False, seed=7)
    full = loaded_model(tmp_path, "gptq", False, dtype=torch.float32)[0].experts
    x, logits = inputs(m=17, seed=7)
    x = x.float()
    total = 0
    for r, strategy in ((0, "round_robin"), (1, "round_robin")):
        rank = loaded_model(tmp_path, "gptq", False, dtype=torch.float32, tp_size=1, tp_rank=0,
                            ep_size=2, ep_rank=r, expert_placement_strategy=strategy)[0].experts
        mine = torch.arange(r, E, 2)  # round robin: experts r, r + 2, ...
        assert rank.local_num_experts == 2
        for name in ("w13_weight", "w2_weight_scale", "w13_weight_zero_point"):
            assert torch.equal(getattr(rank, name), getattr(full, name)[mine])
        total = total + rank(x, logits)
    assert rel_err(total, full(x, logits)) < 1e-5


@pytest.mark.parametrize("config,inter,tp,group", [("int4-g32", 96, 2, 32),
                                                   ("int4-g128", 256, 4, 128),
                                                   ("mxfp4", 320, 4, 32)])
def test_tp_off_the_group_grid_names_it(config, inter, tp, group):
    with pytest.raises(ValueError, match=rf"intermediate_size={inter} and tp_size={tp}: .*"
                                         rf"{inter // tp} .*group size {group}"):
        FusedMoE(E, TOP_K, 256, inter, quant_config=config, tp_size=tp, tp_rank=0)


def test_tp_online_quantization_of_a_float_checkpoint():
    """A bf16 checkpoint quantized as it loads: each rank cuts the same quantized tensors."""
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * H**-0.5
    w2 = torch.randn(E, H, I, generator=gen) * I**-0.5
    layers = [FusedMoE(E, TOP_K, H, I, params_dtype=torch.float32, quant_config="mxfp4",
                       tp_size=tp, tp_rank=r, ep_size=1, ep_rank=0)
              for tp, r in ((1, 0), (2, 0), (2, 1))]
    for layer in layers:
        layer.weight_loader(layer.w13_weight, w13, "experts.w13_weight", "w13", None)
        layer.weight_loader(layer.w2_weight, w2, "experts.w2_weight", "w2", None)
    full, *ranks = layers
    assert torch.equal(torch.cat([r.w2_weight_scale for r in ranks], dim=2), full.w2_weight_scale)
    x, logits = inputs(m=11, seed=3)
    x = x.float()
    assert rel_err(ranks[0](x, logits) + ranks[1](x, logits), full(x, logits)) < 1e-5
