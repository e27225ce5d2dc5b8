"""Checkpoint loading: safetensors folders in Mixtral, Qwen3-MoE,
transformers-5 fused and gpt-oss naming, loaded whole and by every rank of
TP/EP groups; vLLM's name mapping; weight_loader's errors."""

import pytest
import torch

from _dist import E, H, I, K, build, emulated_ranks, random_checkpoint, reference_output, rel_err
from fused_moe.layer import FusedMoE
from fused_moe.weights import iterate_safetensors, load_weights, make_expert_params_mapping

safetensors_torch = pytest.importorskip("safetensors.torch")

M = 29


class Block(torch.nn.Module):
    """An MoE block as Hugging Face models have it: a gate and the experts."""

    def __init__(self, experts):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.experts = experts

    def forward(self, x):
        return self.experts(x, self.gate(x))


def tiny_model(block_name, **layer_kwargs):
    """model.layers[0].<block_name> = Block(FusedMoE)."""
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    layer = torch.nn.Module()
    layer.add_module(block_name, Block(FusedMoE(E, K, H, I, **layer_kwargs)))
    model.model.layers = torch.nn.ModuleList([layer])
    return model


def mixtral_names(full, block):
    names = {}
    for e in range(E):
        gate, up = full["w13_weight"][e].chunk(2)
        for ckpt, t in (("w1", gate), ("w3", up), ("w2", full["w2_weight"][e])):
            names[f"model.layers.0.{block}.experts.{e}.{ckpt}.weight"] = t
    return names


def qwen3_names(full, block):
    names = {}
    for e in range(E):
        gate, up = full["w13_weight"][e].chunk(2)
        gate_b, up_b = full["w13_bias"][e].chunk(2)
        for ckpt, w, b in (("gate_proj", gate, gate_b), ("up_proj", up, up_b),
                           ("down_proj", full["w2_weight"][e], full["w2_bias"][e])):
            names[f"model.layers.0.{block}.experts.{e}.{ckpt}.weight"] = w
            names[f"model.layers.0.{block}.experts.{e}.{ckpt}.bias"] = b
    return names


def fused_names(full, block, transposed=False):
    """transformers 5: gate_up_proj [E, 2I, H] and down_proj [E, H, I], or
    both transposed (Llama-4)."""
    def layout(t):
        return t.transpose(1, 2) if transposed else t
    return {f"model.layers.0.{block}.experts.gate_up_proj": layout(full["w13_weight"]),
            f"model.layers.0.{block}.experts.down_proj": layout(full["w2_weight"])}


def own_names(full, block):
    return {f"model.layers.0.{block}.experts.{name}": t for name, t in full.items()}


NAMINGS = {
    "mixtral": (mixtral_names, "block_sparse_moe", False),
    "qwen3_moe_with_bias": (qwen3_names, "mlp", True),
    "transformers5_fused": (fused_names, "mlp", False),
    "transformers5_fused_transposed": (lambda f, b: fused_names(f, b, transposed=True), "mlp",
                                       False),
    "own_state_dict": (own_names, "mlp", True),
}


def write_folder(path, tensors, files=2):
    """tensors split over ``files`` safetensors files, plus a file to ignore."""
    names = sorted(tensors)
    for i in range(files):
        part = {n: tensors[n].contiguous() for n in names[i::files]}
        safetensors_torch.save_file(part, str(path / f"model-{i:05d}-of-{files:05d}.safetensors"))
    (path / "config.json").write_text("{}")


@pytest.mark.parametrize("tp_size,ep_size", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("naming", NAMINGS)
def test_load_safetensors_folder(naming, tp_size, ep_size, tmp_path):
    to_names, block, bias = NAMINGS[naming]
    full = random_checkpoint(bias=bias)
    gate = torch.randn(E, H) / H**0.5
    tensors = {**to_names(full, block), f"model.layers.0.{block}.gate.weight": gate,
               "model.embed_tokens.weight": torch.randn(16, H)}
    write_folder(tmp_path, tensors)
    x = torch.randn(M, H)
    total = 0
    for r in range(tp_size * ep_size):
        model = tiny_model(block, tp_size=tp_size, tp_rank=r % tp_size, ep_size=ep_size,
                           ep_rank=r // tp_size, has_bias=bias)
        loaded = load_weights(model, iterate_safetensors(tmp_path))
        prefix = f"model.layers.0.{block}."
        assert loaded == {prefix + "gate.weight"} | {prefix + "experts." + n for n in full}
        total = total + getattr(model.model.layers[0], block)(x)
    torch.testing.assert_close(total.double(), reference_output(full, x, x @ gate.T), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("tp_size,ep_size", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("hidden,inter", [(32, 32), (32, 16), (24, 40)])
def test_gpt_oss_interleaved_gate_up_with_biases(hidden, inter, tp_size, ep_size, tmp_path):
    """gpt-oss stores gate_up_proj [E, H, 2I] with gate/up columns interleaved,
    down_proj [E, I, H], and biases; square shapes read as transposed too."""
    full = random_checkpoint(hidden=hidden, inter=inter)
    tensors = {"block.experts.gate_up_proj": full["w13_weight"].transpose(1, 2),
               "block.experts.down_proj": full["w2_weight"].transpose(1, 2),
               "block.experts.gate_up_proj_bias": full["w13_bias"],
               "block.experts.down_proj_bias": full["w2_bias"]}
    write_folder(tmp_path, tensors, files=1)
    x, logits = torch.randn(M, hidden), torch.randn(M, E)
    total = 0
    for r in range(tp_size * ep_size):
        layer = FusedMoE(E, K, hidden, inter, activation="swigluoai", has_bias=True,
                         tp_size=tp_size, tp_rank=r % tp_size, ep_size=ep_size,
                         ep_rank=r // tp_size, prefix="block.experts")
        assert layer.load_weights(iterate_safetensors(tmp_path)) == {
            "block.experts." + n for n in full}
        total = total + layer(x, logits)
    ref = reference_output(full, x, logits, activation="swigluoai")
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=1e-5)


EXPERTS_CLASSES = {
    # class, config, layer kwargs
    "MixtralExperts": ("MixtralConfig", dict(hidden_size=H, intermediate_size=I,
                                             num_local_experts=E), dict()),
    "GptOssExperts": ("GptOssConfig", dict(hidden_size=H, intermediate_size=H,
                                           num_local_experts=E),
                      dict(activation="swigluoai", has_bias=True)),
}


@pytest.mark.parametrize("name", EXPERTS_CLASSES)
def test_matches_transformers_experts_module(name):
    """The layouts as transformers 5 defines them: its own experts module's
    state dict, loaded, computes what the module computes."""
    transformers = pytest.importorskip("transformers")
    config_name, config_kwargs, layer_kwargs = EXPERTS_CLASSES[name]
    config = getattr(transformers, config_name)(**config_kwargs)
    module_path = {"MixtralExperts": "mixtral", "GptOssExperts": "gpt_oss"}[name]
    modeling = __import__(f"transformers.models.{module_path}.modeling_{module_path}",
                          fromlist=[name])
    experts = getattr(modeling, name)(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    x, logits = torch.randn(M, H), torch.randn(M, E)
    weights, ids = torch.topk(torch.softmax(logits, -1), K)
    layer = FusedMoE(E, K, H, config.intermediate_size, renormalize=False, **layer_kwargs)
    assert layer.load_weights(experts.state_dict().items())
    with torch.no_grad():
        expected = experts(x, ids, weights)
    torch.testing.assert_close(layer(x, logits), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_separate_gate_and_up_into_interleaved_layer(tp_size):
    """w1/w3 tensors fill the even/odd rows of a swigluoai layer's w13."""
    full = random_checkpoint()
    tensors = {}
    for e in range(E):
        for ckpt, rows in (("w1", slice(0, None, 2)), ("w3", slice(1, None, 2))):
            tensors[f"{e}.{ckpt}.weight"] = full["w13_weight"][e, rows]
            tensors[f"{e}.{ckpt}.bias"] = full["w13_bias"][e, rows]
        tensors[f"{e}.w2.weight"] = full["w2_weight"][e]
        tensors[f"{e}.w2.bias"] = full["w2_bias"][e]
    x, logits = torch.randn(M, H), torch.randn(M, E)
    total = 0
    for tp_rank in range(tp_size):
        layer = FusedMoE(E, K, H, I, activation="swigluoai", has_bias=True, tp_size=tp_size,
                         tp_rank=tp_rank)
        assert layer.load_weights(tensors.items()) == set(full)
        total = total + layer(x, logits)
    ref = reference_output(full, x, logits, activation="swigluoai")
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=1e-5)


def test_non_gated_layer_loads_up_proj_alone(tmp_path):
    """Nemotron-H style: relu2 on one up projection, named up_proj."""
    full = random_checkpoint(gated=False, bias=False)
    tensors = {}
    for e in range(E):
        tensors[f"experts.{e}.up_proj.weight"] = full["w13_weight"][e]
        tensors[f"experts.{e}.down_proj.weight"] = full["w2_weight"][e]
    x, logits = torch.randn(M, H), torch.randn(M, E)
    total = 0
    for tp_rank in range(2):
        layer = FusedMoE(E, K, H, I, activation="relu2", is_act_and_mul=False, tp_size=2,
                         tp_rank=tp_rank, prefix="experts")
        layer.load_weights(tensors.items())
        total = total + layer(x, logits)
    ref = reference_output(full, x, logits, activation="relu2", is_act_and_mul=False)
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=1e-5)


def test_bf16_checkpoint_into_sharded_layers():
    full = random_checkpoint(dtype=torch.bfloat16)
    x, logits = torch.randn(M, H).bfloat16(), torch.randn(M, E)
    tensors = {k: v.float() for k, v in full.items()}  # a float32 checkpoint, cast on load
    total = 0
    for layer in emulated_ranks(full, 2, 2):
        layer.load_weights(tensors.items())
        total = total + layer(x, logits).float()
    assert rel_err(total, reference_output(full, x, logits)) <= 1e-2


# --- vLLM's mapping ----------------------------------------------------------------


def test_expert_params_mapping_follows_vllm():
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", 2)
    assert mapping == [
        ("experts.w13_", "experts.0.gate_proj.", 0, "w1"),
        ("experts.w2_", "experts.0.down_proj.", 0, "w2"),
        ("experts.w13_", "experts.0.up_proj.", 0, "w3"),
        ("experts.w13_", "experts.1.gate_proj.", 1, "w1"),
        ("experts.w2_", "experts.1.down_proj.", 1, "w2"),
        ("experts.w13_", "experts.1.up_proj.", 1, "w3"),
    ]
    redundant = make_expert_params_mapping("w1", "w2", "w3", 3, num_redundant_experts=2)
    assert [(w, e) for _, w, e, s in redundant if s == "w1"] == [
        ("experts.0.w1.", 0), ("experts.1.w1.", 1), ("experts.2.w1.", 2),
        ("experts.0.w1.", 3), ("experts.1.w1.", 4)]


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_vllm_style_loading_loop_with_redundant_experts(ep_rank):
    """A model's own loop, as vLLM models write it, over the mapping."""
    full = random_checkpoint()
    block = Block(FusedMoE(E, K, H, I, has_bias=True, enable_eplb=True, num_redundant_experts=3,
                           ep_size=2, ep_rank=ep_rank))
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", E, 3)
    params = dict(block.named_parameters())
    checkpoint = {k.replace("model.layers.0.mlp.", ""): v for k, v in
                  qwen3_names(full, "mlp").items()}
    loaded_slots = 0
    for name, tensor in checkpoint.items():
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name in name:
                param = params[name.replace(weight_name, param_name)]
                loaded_slots += param.weight_loader(param, tensor, name, shard_id=shard_id,
                                                    expert_id=expert_id, return_success=True)
    assert loaded_slots == block.experts.local_num_experts * 6  # 3 weights + 3 biases each
    x, logits = torch.randn(M, H), torch.randn(M, E)
    other = build(full, enable_eplb=True, num_redundant_experts=3, ep_size=2,
                  ep_rank=1 - ep_rank)
    total = block.experts(x, logits) + other(x, logits)
    torch.testing.assert_close(total.double(), reference_output(full, x, logits), rtol=1e-4,
                               atol=1e-5)


class VllmStyleModel(torch.nn.Module):
    """The shape of a vLLM MoE model (Qwen3-MoE's): ``model.layers[0].mlp``
    holds a gate and the FusedMoE ``experts``; ``load_weights`` is its loop."""

    def __init__(self, **layer_kwargs):
        super().__init__()
        self.model = torch.nn.Module()
        layer = torch.nn.Module()
        layer.mlp = Block(FusedMoE(E, K, H, I, has_bias=True, **layer_kwargs))
        self.model.layers = torch.nn.ModuleList([layer])

    def forward(self, x):
        return self.model.layers[0].mlp(x)

    def load_weights(self, weights, mapping, **loader_kwargs):
        """Returns how many expert tensors a weight_loader reported loaded."""
        params_dict = dict(self.named_parameters())
        loaded = 0
        for name, loaded_weight in weights:
            for param_name, weight_name, expert_id, shard_id in mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                param = params_dict[name]
                ok = param.weight_loader(param, loaded_weight, name, shard_id=shard_id,
                                         expert_id=expert_id, **loader_kwargs)
                loaded += bool(ok)
                break
            else:  # not an expert tensor: vLLM's default_weight_loader copies it
                with torch.no_grad():
                    params_dict[name].copy_(loaded_weight)
        return loaded


VLLM_MAPPING_CALLS = {
    "keywords": lambda model: FusedMoE.make_expert_params_mapping(
        model, ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
        ckpt_up_proj_name="up_proj", num_experts=E, num_redundant_experts=0),
    "positional": lambda model: FusedMoE.make_expert_params_mapping(
        model, "gate_proj", "down_proj", "up_proj", E),
    "model_none": lambda model: FusedMoE.make_expert_params_mapping(
        None, "gate_proj", "down_proj", "up_proj", num_experts=E),
    "model_keyword": lambda model: FusedMoE.make_expert_params_mapping(
        model=model, ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
        ckpt_up_proj_name="up_proj", num_experts=E),
}


@pytest.mark.parametrize("return_success", [False, True])
@pytest.mark.parametrize("call", VLLM_MAPPING_CALLS)
@pytest.mark.parametrize("tp_size,ep_size", [(1, 1), (2, 2)])
def test_vllm_model_load_weights_loop(call, return_success, tp_size, ep_size):
    """vLLM's own call of make_expert_params_mapping (a model first) and its
    models' loop over checkpoint names, on every rank; the ranks' outputs sum
    to the float64 reference of the checkpoint."""
    full = random_checkpoint()
    gate = torch.randn(E, H) / H**0.5
    checkpoint = {**qwen3_names(full, "mlp"), "model.layers.0.mlp.gate.weight": gate}
    x = torch.randn(M, H)
    total = 0
    for r in range(tp_size * ep_size):
        model = VllmStyleModel(tp_size=tp_size, tp_rank=r % tp_size, ep_size=ep_size,
                               ep_rank=r // tp_size)
        mapping = VLLM_MAPPING_CALLS[call](model)
        assert mapping == make_expert_params_mapping("gate_proj", "down_proj", "up_proj", E)
        kwargs = {"return_success": True} if return_success else {}
        loaded = model.load_weights(checkpoint.items(), mapping, **kwargs)
        experts = model.model.layers[0].mlp.experts
        assert loaded == (experts.local_num_experts * 6 if return_success else 0)
        total = total + model(x)
    torch.testing.assert_close(total.double(), reference_output(full, x, x @ gate.T), rtol=1e-4,
                               atol=1e-5)


# --- safetensors folders ------------------------------------------------------------


def test_iterate_safetensors_reads_every_file_in_order_lazily(tmp_path):
    a, b, c = torch.randn(2, 3), torch.randn(4), torch.randn(1, 5)
    safetensors_torch.save_file({"y": b, "x": a}, str(tmp_path / "b.safetensors"))
    safetensors_torch.save_file({"z": c}, str(tmp_path / "a.safetensors"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    tensors = iterate_safetensors(tmp_path)
    assert next(tensors)[0] == "z"  # a generator: nothing read before asked
    rest = dict(tensors)
    assert sorted(rest) == ["x", "y"]
    assert torch.equal(rest["x"], a) and torch.equal(rest["y"], b)
    with pytest.raises(ValueError, match=r"holds no \*\.safetensors file"):
        list(iterate_safetensors(tmp_path / "missing"))


# --- errors -------------------------------------------------------------------------


@pytest.fixture
def layer():
    return FusedMoE(E, K, H, I, has_bias=True, tp_size=2, tp_rank=1, ep_size=2, ep_rank=0)


def test_weight_loader_skips_experts_of_other_ranks(layer):
    w = torch.randn(I, H)
    assert layer.weight_loader(layer.w13_weight, w, "e.7.w1", "w1", 7, return_success=True) \
        is False
    assert layer.weight_loader(layer.w13_weight, w, "e.7.w1", "w1", 7) is None
    assert layer.weight_loader(layer.w13_weight, w, "e.3.w1", "w1", 3, return_success=True)
    torch.testing.assert_close(layer.w13_weight[3, :I // 2], w[I // 2:])


def test_w2_bias_is_held_by_tp_rank_zero(layer):
    b = torch.randn(H)
    assert layer.weight_loader(layer.w2_bias, b, "e.1.w2.bias", "w2", 1, return_success=True)
    assert torch.count_nonzero(layer.w2_bias) == 0
    rank0 = FusedMoE(E, K, H, I, has_bias=True, tp_size=2, tp_rank=0)
    rank0.weight_loader(rank0.w2_bias, b, "e.1.w2.bias", "w2", 1)
    assert torch.equal(rank0.w2_bias[1], b)


@pytest.mark.parametrize("args,message", [
    (("w13_weight", (I, H + 1), "w1", 0),
     r"e.w \(shard_id='w1'\) has shape \[40, 49\], expected \[40, 48\]"),
    (("w2_weight", (E, I, H + 1), "w2", None), r"has shape \[8, 40, 49\], expected \[8, 48, 40\]"),
    (("w13_weight", (I, H), "w4", 0), r"shard_id='w4' for w13_weight: expected one of"),
    (("w13_weight", (H, I), "w2", 0), r"shard_id='w2' for w13_weight: expected one of \('w1'"),
    (("w2_bias", (H,), "w1", 0), r"shard_id='w1' for w2_bias: expected one of \('w2',\)"),
    (("w13_weight", (I, H), "w1", 8), r"expert_id=8: expected an int in \[0, 8\)"),
    (("w13_weight", (E, I, H), "w1", 2), r"expected \[40, 48\] for expert_id=2"),
    (("w13_bias", (I, H), "w1", 0), r"has shape \[40, 48\], expected \[40\] for expert_id=0"),
    (("w13_bias", (I,), "w1", None), r"expected \[8, 40\] for every expert \(expert_id=None\)"),
])
def test_weight_loader_errors(layer, args, message):
    param_name, shape, shard_id, expert_id = args
    with pytest.raises(ValueError, match=message):
        layer.weight_loader(getattr(layer, param_name), torch.randn(shape), "e.w", shard_id,
                            expert_id)


def test_weight_loader_rejects_foreign_parameter(layer):
    other = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="param is not one of this layer's parameters"):
        layer.weight_loader(other, torch.randn(3), "x", "w1", 0)


def test_bias_checkpoint_into_layer_without_bias():
    layer = FusedMoE(E, K, H, I)
    with pytest.raises(ValueError, match="no w13_bias: expected has_bias=True"):
        layer.load_weights([("0.w1.bias", torch.randn(I))])


def test_unknown_expert_tensor_name():
    layer = FusedMoE(E, K, H, I, prefix="mlp.experts")
    with pytest.raises(ValueError, match=r"mlp.experts.0.w4.weight: not an expert tensor"):
        layer.load_weights([("mlp.experts.0.w4.weight", torch.randn(I, H))])
    with pytest.raises(ValueError, match=r"mlp.experts.8.w1.weight: not an expert tensor"):
        layer.load_weights([("mlp.experts.8.w1.weight", torch.randn(I, H))])
    assert layer.load_weights([("mlp.gate.weight", torch.randn(E, H))]) == set()


def test_intermediate_size_not_divisible_by_tp():
    with pytest.raises(ValueError, match="intermediate_size=40: expected a multiple of tp_size=3"):
        FusedMoE(E, K, H, I, tp_size=3)
