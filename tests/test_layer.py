"""FusedMoE against the float64 reference: every routing option and
activation, shared experts, tensor and expert parallelism emulated in one
process (every rank's layer from the same full checkpoint, outputs summed),
EPLB replicas and load counts, and the configuration errors."""

import gc
import weakref

import pytest
import torch

from _dist import E, H, I, K, build, emulated_ranks, random_checkpoint, reference_output, rel_err
from fused_moe import reference
from fused_moe.layer import FusedMoE

M = 37

# Routing options of the layer; all but use_grouped_topk are reference.fused_topk's too.
ROUTING = {
    "softmax": dict(),
    "sigmoid": dict(scoring_func="sigmoid"),
    "no_renormalize": dict(renormalize=False),
    "routed_scaling": dict(routed_scaling_factor=2.5),
    "grouped": dict(use_grouped_topk=True, num_expert_group=4, topk_group=2),
    "grouped_sigmoid_bias": dict(use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                 scoring_func="sigmoid", e_score_correction_bias="random",
                                 routed_scaling_factor=2.5),
}
ACTIVATIONS = [("silu", True), ("gelu", True), ("gelu_tanh", True), ("relu2", True),
               ("swigluoai", True), ("silu", False), ("gelu", False), ("relu2", False)]


def inputs(m=M, dtype=torch.float32):
    return torch.randn(m, H).to(dtype), torch.randn(m, E)


def check(out, ref, dtype):
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    else:
        assert rel_err(out, ref) <= 1e-2


def routing_kwargs(name):
    kwargs = dict(ROUTING[name])
    if kwargs.get("e_score_correction_bias") == "random":
        kwargs["e_score_correction_bias"] = torch.rand(E)
    layer_only = ("use_grouped_topk",)
    return kwargs, {k: v for k, v in kwargs.items() if k not in layer_only}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ROUTING)
def test_routing_options_match_reference(name, dtype):
    kwargs, routing = routing_kwargs(name)
    full = random_checkpoint(dtype=dtype, bias=False)
    x, logits = inputs(dtype=dtype)
    out = build(full, **kwargs)(x, logits)
    check(out, reference_output(full, x, logits, routing=routing), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("activation,is_act_and_mul", ACTIVATIONS)
def test_activations_match_reference(activation, is_act_and_mul, has_bias, dtype):
    full = random_checkpoint(gated=is_act_and_mul, bias=has_bias, dtype=dtype)
    x, logits = inputs(dtype=dtype)
    layer = build(full, activation=activation, is_act_and_mul=is_act_and_mul)
    ref = reference_output(full, x, logits, activation=activation, is_act_and_mul=is_act_and_mul)
    check(layer(x, logits), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_weight_on_input(dtype):
    full = random_checkpoint(dtype=dtype)
    x, logits = inputs(dtype=dtype)
    out = build(full, top_k=1, apply_router_weight_on_input=True)(x, logits)
    check(out, reference_output(full, x, logits, top_k=1, apply_router_weight_on_input=True),
          dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_routing_function_replaces_fused_topk(dtype):
    full = random_checkpoint(dtype=dtype)
    x, logits = inputs(dtype=dtype)
    seen = []

    def route(hidden_states, router_logits, top_k, renormalize):
        seen.append((hidden_states.shape, top_k, renormalize))
        # Llama-4 style: the top expert by logit, weight sigmoid(logit), int64 ids.
        values, ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.sigmoid(values).double(), ids

    layer = build(full, top_k=1, renormalize=False, custom_routing_function=route)
    out = layer(x, logits)
    values, ids = torch.topk(logits, 1, dim=-1)
    ref = reference.fused_experts(x, full["w13_weight"], full["w2_weight"], torch.sigmoid(values),
                                  ids.int(), w13_bias=full["w13_bias"], w2_bias=full["w2_bias"])
    check(out, ref, dtype)
    assert seen == [(torch.Size([M, H]), 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_experts_output_is_added(dtype):
    full = random_checkpoint(dtype=dtype)
    x, logits = inputs(dtype=dtype)
    shared = torch.nn.Sequential(torch.nn.Linear(H, 24), torch.nn.SiLU(),
                                 torch.nn.Linear(24, H)).to(dtype)
    out = build(full, shared_experts=shared)(x, logits)
    check(out, reference_output(full, x, logits) + shared(x).double(), dtype)


def test_tokens_of_any_leading_shape():
    full = random_checkpoint()
    layer = build(full)
    x, logits = torch.randn(3, 5, H), torch.randn(3, 5, E)
    out = layer(x, logits)
    assert out.shape == (3, 5, H)
    check(out.reshape(-1, H), reference_output(full, x.reshape(-1, H), logits.reshape(-1, E)),
          torch.float32)
    assert layer(x[:0], logits[:0]).shape == (0, 5, H)


def test_parameters_are_frozen_and_carry_their_loader():
    layer = FusedMoE(E, K, H, I, has_bias=True, tp_size=2, tp_rank=1, ep_size=2, ep_rank=0)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"w13_weight": (4, I, H), "w2_weight": (4, H, I // 2),
                      "w13_bias": (4, I), "w2_bias": (4, H)}
    calls = []
    layer.weight_loader = lambda *args, **kwargs: calls.append(args)  # the param calls the layer's
    for p in layer.parameters():
        assert not p.requires_grad
        p.weight_loader(p, "tensor", "name", "w1", 3)
        assert calls.pop() == (p, "tensor", "name", "w1", 3)
    assert FusedMoE(E, K, H, I, is_act_and_mul=False).w13_weight.shape == (E, I, H)
    assert FusedMoE(E, K, H, I).w13_bias is None


def test_layer_is_freed_without_the_garbage_collector():
    # Parameters point back to the layer only weakly: no cycle keeps its
    # (GPU) memory and process group alive after the last reference goes.
    gc.disable()
    try:
        layer = weakref.ref(FusedMoE(E, K, H, I, has_bias=True))
        assert layer() is None
    finally:
        gc.enable()


# --- tensor and expert parallelism, emulated in one process --------------------------

PARALLEL = [(2, 1, "linear"), (1, 2, "linear"), (2, 2, "linear"), (1, 3, "round_robin"),
            (2, 2, "round_robin"), (4, 1, "linear")]
VARIANTS = {
    "silu": dict(activation="silu"),
    "swigluoai_bias": dict(activation="swigluoai"),
    "relu2_no_mul_bias": dict(activation="relu2", is_act_and_mul=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp_size,ep_size,strategy", PARALLEL)
def test_sum_over_ranks_equals_unsharded_layer(tp_size, ep_size, strategy, variant):
    kwargs = VARIANTS[variant]
    full = random_checkpoint(gated=kwargs.get("is_act_and_mul", True), bias="bias" in variant)
    x, logits = inputs()
    ranks = emulated_ranks(full, tp_size, ep_size, expert_placement_strategy=strategy, **kwargs)
    total = sum(layer(x, logits) for layer in ranks)
    unsharded = build(full, **kwargs)(x, logits)
    torch.testing.assert_close(total, unsharded, rtol=1e-5, atol=1e-5)
    check(total, reference_output(full, x, logits, **kwargs), torch.float32)


def test_emulated_ranks_add_shared_experts_once():
    full = random_checkpoint()
    x, logits = inputs()
    shared = torch.nn.Linear(H, H)
    ranks = emulated_ranks(full, 2, 2, shared_experts=shared)
    assert [layer.adds_shared for layer in ranks] == [True, False, False, False]
    total = sum(layer(x, logits) for layer in ranks)
    check(total, reference_output(full, x, logits) + shared(x).double(), torch.float32)


def test_bf16_sharded_layer_matches_reference():
    full = random_checkpoint(dtype=torch.bfloat16)
    x, logits = inputs(dtype=torch.bfloat16)
    total = sum(layer(x, logits).float() for layer in emulated_ranks(full, 2, 2))
    assert rel_err(total, reference_output(full, x, logits)) <= 1e-2


# --- EPLB ------------------------------------------------------------------------


@pytest.mark.parametrize("ep_size,strategy", [(1, "linear"), (2, "linear"), (4, "round_robin")])
def test_redundant_experts_change_nothing_but_placement(ep_size, strategy):
    full = random_checkpoint()
    x, logits = inputs()
    ranks = emulated_ranks(full, 1, ep_size, enable_eplb=True, num_redundant_experts=3,
                           expert_placement_strategy=strategy)
    assert sum(layer.local_num_experts for layer in ranks) == E + 3
    total = sum(layer(x, logits) for layer in ranks)
    plain = build(full)(x, logits)
    torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-5)
    check(total, reference_output(full, x, logits), torch.float32)


def test_replicas_receive_tokens():
    full = random_checkpoint()
    x, logits = inputs()
    logits[:, 1] += 20  # every token picks expert 1, held by physical 1 and its replica 9
    layer = build(full, enable_eplb=True, num_redundant_experts=2, ep_size=2, ep_rank=1)
    assert layer.local_slot_of == {5: 0, 6: 1, 7: 2, 8: 3, 9: 4}
    _, ids = layer.route(x, logits)
    assert ids[:, 0].tolist() == [9 if t % 2 else 1 for t in range(M)]
    out = layer(x, logits)
    # This rank holds experts 5..7 and the replicas 8, 9 of experts 0, 1, which
    # odd tokens use: its share of the output.
    weights, ref_ids = reference.fused_topk(logits, K)
    odd = (torch.arange(M) % 2 == 1)[:, None]
    mine = torch.isin(ref_ids, torch.tensor([5, 6, 7])) | ((ref_ids <= 1) & odd)
    ref = reference.fused_experts(x, full["w13_weight"], full["w2_weight"],
                                  torch.where(mine, weights, 0.0), ref_ids,
                                  w13_bias=full["w13_bias"], w2_bias=full["w2_bias"])
    check(out, ref, torch.float32)


def test_expert_load_counts_routed_logical_ids():
    full = random_checkpoint()
    layer = build(full, enable_eplb=True, num_redundant_experts=5, ep_size=2, ep_rank=0)
    assert layer.expert_load.dtype == torch.int64 and "expert_load" in dict(layer.named_buffers())
    expected = torch.zeros(E, dtype=torch.int64)
    for m in (M, 5):
        x, logits = inputs(m)
        layer(x, logits)
        expected += torch.bincount(reference.fused_topk(logits, K)[1].long().flatten(),
                                   minlength=E)
    assert torch.equal(layer.expert_load, expected)
    assert build(full).expert_load is None


def test_compiles_into_one_graph_and_runs_in_inference_mode():
    full = random_checkpoint()
    layer = build(full, enable_eplb=True, num_redundant_experts=2, ep_size=2, ep_rank=1,
                  shared_experts=torch.nn.Linear(H, H))
    x, logits = inputs()
    with torch.inference_mode():
        eager = layer(x, logits)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, logits)
    torch.testing.assert_close(compiled, eager)
    assert int(layer.expert_load.sum()) == 2 * M * K


# --- configuration errors ---------------------------------------------------------

BAD = [
    (dict(intermediate_size=30, tp_size=4), r"intermediate_size=30: expected a multiple of "
                                            r"tp_size=4"),
    (dict(top_k=9), r"top_k=9: expected an int in \[1, num_experts=8\]"),
    (dict(num_experts=0), r"num_experts=0: expected a positive int"),
    (dict(activation="swish"), r"activation='swish': expected one of"),
    (dict(activation="swigluoai", is_act_and_mul=False), r"is_act_and_mul=False: expected"),
    (dict(scoring_func="tanh"), r"scoring_func='tanh': expected one of"),
    (dict(use_grouped_topk=True), r"num_expert_group=None: expected a divisor of num_experts=8"),
    (dict(use_grouped_topk=True, num_expert_group=3, topk_group=1), r"num_expert_group=3"),
    (dict(use_grouped_topk=True, num_expert_group=4, topk_group=5),
     r"topk_group=5: expected an int in \[1, num_expert_group=4\]"),
    (dict(use_grouped_topk=True, num_expert_group=4, topk_group=1, top_k=3),
     r"top_k=3: expected at most"),
    (dict(num_expert_group=4, topk_group=2), r"num_expert_group=4, topk_group=2: expected None"),
    (dict(e_score_correction_bias=torch.rand(7)), r"shape \[7\]: expected \[num_experts\] = \[8\]"),
    (dict(apply_router_weight_on_input=True), r"top_k=2: expected top_k=1"),
    (dict(custom_routing_function=5), r"custom_routing_function=5: expected a callable"),
    (dict(num_redundant_experts=2), r"num_redundant_experts=2: expected 0 unless enable_eplb"),
    (dict(ep_size=9), r"ep_size=9: expected 1 <= ep_size <= the number of \(physical\) experts 8"),
    (dict(tp_size=2, tp_rank=2), r"tp_rank=2: expected 0 <= tp_rank < 2"),
    (dict(expert_placement_strategy="random", ep_size=2), r"expert_placement_strategy='random'"),
    (dict(reduce_results=True, tp_size=2), r"reduce_results=True: expected a process group of "
                                           r"tp_size \* ep_size = 2 ranks"),
    (dict(process_group=object()), r"process_group was given but torch.distributed is not"),
    (dict(params_dtype=torch.int32), r"params_dtype=torch.int32: expected a floating dtype"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_configuration_raises(kwargs, message):
    sizes = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    for name in list(sizes):
        if name in kwargs:
            sizes[name] = kwargs.pop(name)
    with pytest.raises(ValueError, match=message):
        FusedMoE(**sizes, **kwargs)


# --- CUDA ------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_reference_without_host_sync(dtype):
    full = {k: v.cuda() for k, v in random_checkpoint(dtype=dtype).items()}
    options = dict(device="cuda", enable_eplb=True, num_redundant_experts=3,
                   use_grouped_topk=True, num_expert_group=4, topk_group=2)
    ranks = emulated_ranks(full, 2, 2, **options)
    shared = torch.nn.Linear(H, H, device="cuda", dtype=dtype)
    layer = build(full, tp_size=2, tp_rank=0, ep_size=2, ep_rank=0, shared_experts=shared,
                  **options)
    x, logits = (t.cuda() for t in inputs(dtype=dtype))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    total = out + sum(other(x, logits) for other in ranks[1:])
    ref = reference_output(full, x, logits, routing=dict(num_expert_group=4, topk_group=2))
    check(total, ref + shared(x).double(), dtype)


@cuda
@pytest.mark.cuda
def test_cuda_graph_replays_with_new_inputs():
    full = {k: v.cuda() for k, v in random_checkpoint().items()}
    layer = build(full, device="cuda", enable_eplb=True, num_redundant_experts=2)
    x, logits = (t.cuda() for t in inputs())
    layer(x, logits)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    new_x, new_logits = (t.cuda() for t in inputs())
    x.copy_(new_x)
    logits.copy_(new_logits)
    graph.replay()
    check(out, reference_output(full, new_x, new_logits), torch.float32)
