"""FusedMoE: the Mixture-of-Experts layer as a torch.nn.Module: routing, the
fused expert computation, tensor and expert parallelism, EPLB replicas, and
loading its own tensors (vLLM's ``weight_loader`` and
``make_expert_params_mapping``, on the class as vLLM has them; the sharding
rules are in fused_moe.shards). Loading a whole model is fused_moe.weights,
which builds on this module."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch

from . import shards
from .experts import ACTIVATIONS, fused_experts
from .parallel import (
    all_reduce,
    choose_replicas,
    determine_expert_map,
    initial_physical_to_logical,
    record_expert_load,
    replica_table,
    resolve_parallel,
)
from .quant import FP8_DTYPE, QuantConfig, as_quant_config
from .routing import SCORING_FUNCS, fused_topk


class FusedMoE(torch.nn.Module):
    """``forward(hidden_states [..., H], router_logits [..., E]) -> [..., H]``.

    Routes each token to ``top_k`` of ``num_experts`` experts (fused_topk, or
    ``custom_routing_function(hidden_states [M, H], router_logits [M, E],
    top_k, renormalize) -> (weights, ids)``, whose weights are final: no
    routed_scaling_factor) and runs them with fused_experts. Parameters, as
    fused_experts takes them: ``w13_weight`` [E_local, 2I/tp, H] (gate rows
    then up rows; interleaved gate/up pairs for ``swigluoai``; I/tp rows of
    one projection when not ``is_act_and_mul``), ``w2_weight`` [E_local, H,
    I/tp], and with ``has_bias`` ``w13_bias``, ``w2_bias``.

    Parallelism (see fused_moe.parallel): this rank holds the experts of
    ``ep_rank`` (of ``ep_size``), each cut to its ``1/tp_size`` slice of the
    intermediate dimension, and returns its partial output; the sum over all
    ``tp_size * ep_size`` ranks is the layer's output. ``reduce_results=True``
    sums it with an all-reduce over ``process_group``. Unset sizes and ranks
    come from the group when torch.distributed is initialised, else 1 and 0:
    no size given -> tp_size = group size, ep_size = 1; one given -> the other
    is group size // it; ranks from the group need tp_size * ep_size == group
    size and are tp_rank = rank % tp_size, ep_rank = rank // tp_size. Sizes and
    ranks all given are used as they are (one process can build every rank).

    Rules that make the sum exact: the down-projection bias ``w2_bias`` is held
    by TP rank 0 (zeros elsewhere); ``shared_experts`` (a module computing the
    full shared output from hidden_states) is added by every rank after the
    all-reduce with ``reduce_results``, else by rank tp_rank == ep_rank == 0
    only.

    EPLB (``enable_eplb``): ``num_redundant_experts`` extra physical experts
    replicate logical experts (physical p holds logical p % num_experts); token
    t uses replica t % num_replicas of each of its experts; ``expert_load``
    counts the slots routed to each logical expert, accumulated over forwards.

    FP8 experts (``quant_config``: a fused_moe.quant.QuantConfig, one of the
    names "fp8" (block), "fp8-block", "fp8-channel", "fp8-tensor", or a
    checkpoint's ``quantization_config`` dict): ``w13_weight``/``w2_weight``
    are float8_e4m3fn and the scales take vLLM's names, fp32, one row per
    local expert:

    - block (bn, bk): ``w13_weight_scale_inv`` [E, ceil(2I/bn), ceil(H/bk)],
      ``w2_weight_scale_inv`` [E, ceil(H/bn), ceil(I/bk)], on this rank's grid
      ``block_shape`` (the checkpoint's, or finer where I/tp does not fill
      whole blocks; see fused_moe.shards);
    - channel: ``w13_weight_scale`` [E, 2I, 1], ``w2_weight_scale`` [E, H, 1];
    - tensor: ``w13_weight_scale`` [E, 2] (gate's and up's: [E, 1] without
      is_act_and_mul), ``w2_weight_scale`` [E];
    - static activations: ``w13_input_scale`` [E], ``w2_input_scale`` [E];
      the forward uses the largest of each.

    4-bit experts (``quant_config`` "mxfp4", "int4-g32/g64/g128",
    "int4-g128-asym", a 4-bit QuantConfig or checkpoint config; I/tp_size a
    multiple of the group):
    ``w13_weight`` uint8 [E, 2I, H/2], ``w2_weight`` uint8 [E, H, I/2] (two
    codes a byte), ``w13_weight_scale`` [E, 2I, H/g], ``w2_weight_scale``
    [E, H, I/g] (e8m0 uint8 for mxfp4, params_dtype for int4) and, for
    asymmetric int4, ``w13_weight_zero_point``/``w2_weight_zero_point`` (uint8,
    the scales' shapes). GPTQ, AWQ and compressed-tensors pack-quantized
    checkpoints load into them per expert, repacked once (names in
    fused_moe.shards); give the checkpoint's quantization_config.

    A float checkpoint loads into an FP8 or 4-bit layer quantized (online
    quantization). ``process_weights_after_loading`` turns the scales into
    what the kernels take, once; the first forward calls it if loading did not.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = False,
        renormalize: bool = True,
        use_grouped_topk: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        custom_routing_function: Callable | None = None,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        e_score_correction_bias: torch.Tensor | None = None,
        apply_router_weight_on_input: bool = False,
        activation: str = "silu",
        is_act_and_mul: bool = True,
        has_bias: bool = False,
        tp_size: int | None = None,
        tp_rank: int | None = None,
        ep_size: int | None = None,
        ep_rank: int | None = None,
        process_group=None,
        expert_placement_strategy: str = "linear",
        enable_eplb: bool = False,
        num_redundant_experts: int = 0,
        shared_experts: torch.nn.Module | None = None,
        quant_config=None,
        prefix: str = "",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_sizes(num_experts, top_k, hidden_size, intermediate_size)
        _check_routing(num_experts, top_k, use_grouped_topk, num_expert_group, topk_group,
                       custom_routing_function, scoring_func, e_score_correction_bias,
                       apply_router_weight_on_input)
        _check_activation(activation, is_act_and_mul)
        if num_redundant_experts and not enable_eplb:
            raise ValueError(f"num_redundant_experts={num_redundant_experts}: expected 0 unless "
                             "enable_eplb=True")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.custom_routing_function = custom_routing_function
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.e_score_correction_bias = e_score_correction_bias
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.activation = activation
        self.is_act_and_mul = is_act_and_mul
        self.shared_experts = shared_experts
        self.prefix = prefix
        self.quant_config = as_quant_config(quant_config)
        self._init_parallel(tp_size, tp_rank, ep_size, ep_rank, process_group, reduce_results)
        self._init_experts(expert_placement_strategy, enable_eplb, num_redundant_experts, device)
        self.params_dtype = params_dtype or torch.get_default_dtype()  # int4 scales' too
        self._init_params(self.params_dtype, has_bias, device)
        self._init_scales(device)

    def _init_parallel(self, tp_size, tp_rank, ep_size, ep_rank, process_group, reduce_results):
        config = resolve_parallel(tp_size, tp_rank, ep_size, ep_rank, process_group)
        if self.intermediate_size % config.tp_size:
            raise ValueError(f"intermediate_size={self.intermediate_size}: expected a multiple of "
                             f"tp_size={config.tp_size}")
        ranks = config.tp_size * config.ep_size
        if reduce_results and config.group_size != ranks:
            raise ValueError(f"reduce_results=True: expected a process group of tp_size * ep_size"
                             f" = {ranks} ranks to sum over, got {config.group_size}")
        self.tp_size, self.tp_rank = config.tp_size, config.tp_rank
        self.ep_size, self.ep_rank = config.ep_size, config.ep_rank
        self.process_group = process_group
        self.reduce_results = reduce_results and ranks > 1
        self.adds_shared = reduce_results or (config.tp_rank == 0 and config.ep_rank == 0)

    def _init_experts(self, strategy, enable_eplb, num_redundant_experts, device):
        self.expert_placement_strategy = strategy
        self.num_redundant_experts = num_redundant_experts
        self.num_physical_experts = self.num_experts + num_redundant_experts
        self.local_num_experts, expert_map = determine_expert_map(
            self.ep_size, self.ep_rank, self.num_physical_experts, strategy)
        self.register_buffer("expert_map", _to(expert_map, device), persistent=False)
        # Loading needs, on the host: the local physical experts and their logical ids.
        local = (torch.arange(self.num_physical_experts) if expert_map is None
                 else torch.nonzero(expert_map >= 0).flatten())
        self.local_slot_of = {p: slot for slot, p in enumerate(local.tolist())}
        physical_to_logical = initial_physical_to_logical(self.num_experts, num_redundant_experts)
        self.local_logical_experts = physical_to_logical[local]
        self.checkpoint_names = shards.expert_checkpoint_names(self.num_experts,
                                                               num_redundant_experts)
        self.enable_eplb = enable_eplb
        table = counts = load = None
        if enable_eplb:
            table, counts = replica_table(physical_to_logical, self.num_experts)
            load = torch.zeros(self.num_experts, dtype=torch.int64)
        for name, buffer in (("replica_table", table), ("replica_count", counts),
                             ("expert_load", load)):
            self.register_buffer(name, _to(buffer, device), persistent=False)

    def _init_params(self, dtype, has_bias, device):
        if not dtype.is_floating_point:
            raise ValueError(f"params_dtype={dtype}: expected a floating dtype")
        if self.quant_config is not None and self.quant_config.packed4:
            shards.check_packed4_tp(self.quant_config, self.intermediate_size, self.tp_size)
        inter = self.intermediate_size // self.tp_size
        rows = 2 * inter if self.is_act_and_mul else inter
        e, h = self.local_num_experts, self.hidden_size
        weight_dtype = dtype if self.quant_config is None else FP8_DTYPE
        packed = 1
        if self.quant_config is not None and self.quant_config.packed4:
            weight_dtype, packed = torch.uint8, 2  # two 4-bit codes a byte along K
        self.w13_weight = self._param(torch.empty(e, rows, h // packed, dtype=weight_dtype,
                                                  device=device))
        self.w2_weight = self._param(torch.empty(e, h, inter // packed, dtype=weight_dtype,
                                                 device=device))
        # Biases start at zero: TP ranks other than 0 keep w2_bias at zero.
        self.w13_bias = self._param(torch.zeros(e, rows, dtype=dtype, device=device)) \
            if has_bias else None
        self.w2_bias = self._param(torch.zeros(e, h, dtype=dtype, device=device)) \
            if has_bias else None

    def _init_scales(self, device):
        """The scale parameters of the FP8 scheme (none without one). Weight
        scales start at 1; input scales at 0, so that one never loaded is
        found by process_weights_after_loading."""
        config = self.quant_config
        self.block_shape = None
        self._op_scales = None  # the kernels' form of the scales, made after loading
        if config is None:
            return
        if config.packed4:
            self._init_packed4_scales(device)
            return
        e, h = self.local_num_experts, self.hidden_size
        rows, inter = self.w13_weight.shape[1], self.w2_weight.shape[2]
        if config.weight_scale == "block":
            self.block_shape = shards.local_block_shape(config.block_shape, inter)
            grid = QuantConfig.fp8_block(self.block_shape)
            shapes = {"w13_weight_scale_inv": grid.weight_scale_shape(e, rows, h),
                      "w2_weight_scale_inv": grid.weight_scale_shape(e, h, inter)}
        elif config.weight_scale == "channel":
            shapes = {"w13_weight_scale": (e, rows, 1), "w2_weight_scale": (e, h, 1)}
        else:
            shapes = {"w13_weight_scale": (e, 2 if self.is_act_and_mul else 1),
                      "w2_weight_scale": (e,)}
        for name, shape in shapes.items():
            setattr(self, name, self._param(torch.ones(shape, device=device)))
        for name in ("w13_input_scale", "w2_input_scale"):
            setattr(self, name, self._param(torch.zeros(e, device=device))
                    if config.static_activations else None)

    def _init_packed4_scales(self, device):
        """4-bit weights' scales (e8m0 bytes for mxfp4, params_dtype for int4;
        1.0 to start) and, for asymmetric int4, zero points (8 to start),
        [E, N, K/group] each, with vLLM's names."""
        config = self.quant_config
        e, h = self.local_num_experts, self.hidden_size
        rows, inter = self.w13_weight.shape[1], self.intermediate_size // self.tp_size
        mx = config.weight_dtype == "mxfp4"
        dtype = torch.uint8 if mx else self.params_dtype
        one = 127 if mx else 1.0  # 2^(127 - 127)
        for prefix, n, k in (("w13", rows, h), ("w2", h, inter)):
            shape = config.weight_scale_shape(e, n, k)
            setattr(self, f"{prefix}_weight_scale",
                    self._param(torch.full(shape, one, dtype=dtype, device=device)))
            setattr(self, f"{prefix}_weight_zero_point", self._param(
                torch.full(shape, 8, dtype=torch.uint8, device=device))
                if config.zero_point else None)
        for name in ("w13_input_scale", "w2_input_scale"):
            setattr(self, name, None)

    def _param(self, data):
        param = torch.nn.Parameter(data, requires_grad=False)
        # Through a weak reference: a bound method here would make a cycle
        # (layer -> param -> layer) that keeps the layer's GPU memory and
        # process group alive until the garbage collector runs.
        layer = weakref.ref(self)
        param.weight_loader = lambda *args, **kwargs: layer().weight_loader(*args, **kwargs)
        return param

    # --- forward ------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)  # a view where it can be: ops take strides
        logits = router_logits.reshape(-1, router_logits.shape[-1])
        topk_weights, topk_ids = self.route(x, logits)
        if self.quant_config is not None and self._op_scales is None:
            self.process_weights_after_loading()
        out = fused_experts(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
            activation=self.activation, is_act_and_mul=self.is_act_and_mul,
            w13_bias=self.w13_bias, w2_bias=self.w2_bias, expert_map=self.expert_map,
            global_num_experts=self.num_physical_experts,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
            **(self._op_scales or {}))
        if self.reduce_results:
            out = all_reduce(out, self.process_group)
        if self.shared_experts is not None and self.adds_shared:
            out = out + self.shared_experts(hidden_states).reshape(out.shape)
        return out.reshape(hidden_states.shape)

    def route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights f32 [M, K], ids int32 [M, K]) for [M, H] tokens: logical
        expert ids, or physical ones (a replica each) with EPLB."""
        if self.custom_routing_function is not None:
            weights, ids = self.custom_routing_function(hidden_states, router_logits, self.top_k,
                                                        self.renormalize)
            weights, ids = weights.float(), ids.int()
        else:
            weights, ids = fused_topk(
                router_logits, self.top_k, renormalize=self.renormalize,
                scoring_func=self.scoring_func,
                e_score_correction_bias=self.e_score_correction_bias,
                num_expert_group=self.num_expert_group, topk_group=self.topk_group,
                routed_scaling_factor=self.routed_scaling_factor)
        if self.enable_eplb:
            record_expert_load(self.expert_load, ids)
            ids = choose_replicas(ids, self.replica_table, self.replica_count)
        return weights, ids

    # --- after loading -------------------------------------------------------------

    def process_weights_after_loading(self) -> None:
        """Makes the scales' kernel form from the loaded ones, once (vLLM's
        step of the same name): block scales as they are; channel [E, N, 1]
        as [E, N] (views); tensor scales of w1 and w3 spread over their rows,
        [E, 2I] (exact: no requantization); static input scales as the
        largest of the experts'. Checks that static input scales were loaded.
        Loading anything afterwards, or moving the layer, makes it again."""
        config = self.quant_config
        if config is None:
            return
        if config.packed4:
            self._op_scales = {
                "w13_scale": self.w13_weight_scale, "w2_scale": self.w2_weight_scale,
                "w13_zp": self.w13_weight_zero_point, "w2_zp": self.w2_weight_zero_point}
            return
        with torch.no_grad():
            scales = {"block_shape": self.block_shape,
                      "per_act_token_quant": config.per_act_token_quant}
            if config.weight_scale == "block":
                scales.update(w13_scale=self.w13_weight_scale_inv,
                              w2_scale=self.w2_weight_scale_inv)
            elif config.weight_scale == "channel":
                scales.update(w13_scale=self.w13_weight_scale.squeeze(-1),
                              w2_scale=self.w2_weight_scale.squeeze(-1))
            else:
                scales.update(w13_scale=self._w13_tensor_scale_per_row(),
                              w2_scale=self.w2_weight_scale)
            if config.static_activations:
                scales.update(a13_scale=_static_input_scale(self.w13_input_scale, "w13"),
                              a2_scale=_static_input_scale(self.w2_input_scale, "w2"))
        self._op_scales = scales

    def _w13_tensor_scale_per_row(self):
        """[E, 2] (gate, up) tensor scales as one per w13 row, [E, rows]."""
        s = self.w13_weight_scale
        half = self.w13_weight.shape[1] // s.shape[1]
        if self.activation == "swigluoai":  # gate/up rows interleaved
            return s.repeat(1, half)
        return s.repeat_interleave(half, dim=1)

    def _apply(self, fn, *args, **kwargs):
        # Moved or cast: the kernel-form scales are made again from the new parameters.
        self._op_scales = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._op_scales = None
        return super()._load_from_state_dict(*args, **kwargs)

    # --- loading ------------------------------------------------------------------

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      weight_name: str, shard_id: str, expert_id: int | None,
                      return_success: bool = False) -> bool | None:
        """Copies this rank's part of a full checkpoint tensor into ``param``.

        ``shard_id``: ``w1`` (gate), ``w3`` (up), ``w13`` (gate and up fused),
        ``w2`` (down). ``loaded_weight`` is one expert's tensor (``[out, in]``,
        biases ``[out]``) of global physical expert ``expert_id``, or every
        expert's (``[E, out, in]`` or transformers 5's ``[E, in, out]``, with
        ``expert_id=None``). Experts on other ranks are skipped: returns False
        then (True when loaded) if ``return_success``, else None.
        """
        self._op_scales = None
        with torch.no_grad():
            ok = shards.load_expert_weight(self, param, loaded_weight, weight_name, shard_id,
                                           expert_id)
        return ok if return_success else None

    @classmethod
    def make_expert_params_mapping(cls, *args, **kwargs) -> list[tuple[str, str, int, str]]:
        """``[(param_name, weight_name, expert_id, shard_id)]``, as vLLM's (see
        fused_moe.shards.make_expert_params_mapping).

        Takes vLLM's arguments, ``(model, ckpt_gate_proj_name, ckpt_down_proj_name,
        ckpt_up_proj_name, num_experts, num_redundant_experts=0)``, or the same
        without ``model``, as older vLLM had them. ``model`` (any object, or None)
        is not used: vLLM reads EPLB details from it, which here come from
        ``num_redundant_experts``. A str first argument means the form without it.
        """
        if args and not isinstance(args[0], str):
            args = args[1:]
        kwargs.pop("model", None)
        return shards.make_expert_params_mapping(*args, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     prefix: str | None = None) -> set[str]:
        """Loads the tensors named ``{prefix}.<expert tensor>`` (names and
        layouts in fused_moe.shards; ``prefix`` defaults to the layer's own) and
        skips the others. Returns the loaded parameter names,
        ``{prefix}.w13_weight`` etc."""
        prefix = self.prefix if prefix is None else prefix
        head = f"{prefix}." if prefix else ""
        loaded = set()
        for name, tensor in weights:
            if not name.startswith(head):
                continue
            for param_name, shard_id, expert_id in shards.targets(self, name[len(head):], name):
                param = getattr(self, param_name, None)
                if param is None:
                    raise ValueError(shards.missing_param_message(name, param_name))
                if self.weight_loader(param, tensor, name, shard_id, expert_id,
                                      return_success=True):
                    loaded.add(head + param_name)
        return loaded

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation!r}, tp={self.tp_rank}/{self.tp_size}, "
                f"ep={self.ep_rank}/{self.ep_size}, local_num_experts={self.local_num_experts}"
                + ("" if self.quant_config is None else f", quant_config={self.quant_config}"))


def _to(t, device):
    return None if t is None else t.to(device)


def _static_input_scale(scale, name):
    """The one activation scale of a static scheme: the largest expert's, so
    that no expert's inputs saturate."""
    if bool((scale <= 0).any()):
        missing = torch.nonzero(scale <= 0).flatten().tolist()
        raise ValueError(f"{name}_input_scale of local experts {missing} is not loaded: a static "
                         "activation scheme needs the checkpoint's input_scale of every expert")
    return scale.amax().reshape(1)


def _check_sizes(num_experts, top_k, hidden_size, intermediate_size):
    for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r}: expected an int in [1, num_experts={num_experts}]")


def _check_routing(num_experts, top_k, use_grouped_topk, num_expert_group, topk_group,
                   custom_routing_function, scoring_func, e_score_correction_bias,
                   apply_router_weight_on_input):
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func={scoring_func!r}: expected one of {SCORING_FUNCS}")
    if use_grouped_topk:
        _check_groups(num_experts, top_k, num_expert_group, topk_group)
    elif num_expert_group is not None or topk_group is not None:
        raise ValueError(f"num_expert_group={num_expert_group}, topk_group={topk_group}: "
                         "expected None unless use_grouped_topk=True")
    if custom_routing_function is not None and not callable(custom_routing_function):
        raise ValueError(f"custom_routing_function={custom_routing_function!r}: expected a "
                         "callable (hidden_states, router_logits, top_k, renormalize) -> "
                         "(weights, ids)")
    bias = e_score_correction_bias
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"e_score_correction_bias has shape {list(bias.shape)}: expected "
                         f"[num_experts] = [{num_experts}]")
    if apply_router_weight_on_input and top_k != 1:
        raise ValueError(f"apply_router_weight_on_input=True with top_k={top_k}: expected "
                         "top_k=1")


def _check_groups(num_experts, top_k, num_expert_group, topk_group):
    if not isinstance(num_expert_group, int) or num_expert_group < 1 \
            or num_experts % num_expert_group:
        raise ValueError(f"num_expert_group={num_expert_group!r}: expected a divisor of "
                         f"num_experts={num_experts} with use_grouped_topk=True")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"topk_group={topk_group!r}: expected an int in "
                         f"[1, num_expert_group={num_expert_group}]")
    if top_k > topk_group * (num_experts // num_expert_group):
        raise ValueError(f"top_k={top_k}: expected at most topk_group * experts per group = "
                         f"{topk_group * (num_experts // num_expert_group)}")


def _check_activation(activation, is_act_and_mul):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    if activation == "swigluoai" and not is_act_and_mul:
        raise ValueError("activation='swigluoai' with is_act_and_mul=False: expected "
                         "is_act_and_mul=True (swigluoai is gated)")
