// Every op's entry point: check the inputs, allocate the outputs, fill the
// kernel parameters and run the CPU or CUDA kernel of the inputs' device.
#include "ops.h"

#include <vector>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>

#include "checks.h"
#include "cpu/cpu_kernels.h"
#include "cuda/launch.h"
#include "kernel_params.h"

namespace fused_moe {
namespace {

using torch::headeronly::ScalarType;
constexpr auto kFloats = {ScalarType::Float, ScalarType::BFloat16, ScalarType::Half};
constexpr auto kIds = {ScalarType::Int, ScalarType::Long};

Tensor alloc(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

Tensor alloc(const Tensor& like, std::vector<int64_t> sizes) {
  return alloc(like, std::move(sizes), like.scalar_type());
}

template <typename T>
T* ptr(const Tensor& t) { return static_cast<T*>(t.data_ptr()); }

template <typename T>
T* ptr(const OptTensor& t) { return t ? static_cast<T*>(t->data_ptr()) : nullptr; }

ExpertIds expert_ids(const Tensor& t) {
  return {t.data_ptr(), t.scalar_type() == ScalarType::Long};
}

// Every op takes tensors of any strides. The CUDA kernels read row-strided
// matrices in place (weights [E, N, K], tokens [M, H]): innermost stride 1,
// every other stride a whole number of 16-byte vectors (what TMA and the
// vector loads need). Anything else, every other input, and every input of a
// CPU kernel is copied once into a dense tensor here.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

Tensor rows_in_place(const Tensor& t) {
  if (t.dim() < 2 || !t.is_cuda() || t.stride(t.dim() - 1) != 1) return dense(t);
  const int64_t bytes = static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if ((t.stride(d) * bytes) % 16 != 0) return dense(t);
  return t;
}

// Scratch memory from PyTorch's caching allocator, so CUDA graphs capture it.
Tensor workspace(const Tensor& like, size_t bytes) {
  return alloc(like, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
}

// A CUDA launch's context: PyTorch's current stream on t's device, and that
// device made current until the launch returns.
struct OnDevice {
  explicit OnDevice(const Tensor& t)
      : stream(cuda::current_stream(t.get_device_index())), guard(t.get_device_index()) {}
  cudaStream_t stream;
  torch::stable::accelerator::DeviceGuard guard;
};

Scoring parse_scoring(const char* op, const std::string& s) {
  if (s == "softmax") return Scoring::kSoftmax;
  if (s == "sigmoid") return Scoring::kSigmoid;
  fail(op, ": scoring_func must be 'softmax' or 'sigmoid', got '", s, "'");
}

Activation parse_activation(const char* op, const std::string& s, bool gated) {
  Activation a;
  if (s == "silu") a = Activation::kSilu;
  else if (s == "gelu") a = Activation::kGelu;
  else if (s == "gelu_tanh") a = Activation::kGeluTanh;
  else if (s == "relu2") a = Activation::kRelu2;
  else if (s == "swigluoai") a = Activation::kSwigluOai;
  else fail(op, ": activation must be one of silu, gelu, gelu_tanh, relu2, swigluoai, got '", s, "'");
  FUSED_MOE_CHECK(gated || a != Activation::kSwigluOai, op,
                  ": activation 'swigluoai' needs is_act_and_mul=True (it is gated)");
  return a;
}

}  // namespace

std::tuple<Tensor, Tensor> topk(Tensor gating_output, int64_t topk, bool renormalize,
                                std::string scoring_func, OptTensor bias,
                                int64_t num_expert_group, int64_t topk_group,
                                double routed_scaling_factor) {
  const char* op = "fused_moe.topk";
  const Tensor t = dense(gating_output);
  if (bias) bias = dense(*bias);
  Arg{op, "gating_output", t}.expect({ScalarType::Float, ScalarType::BFloat16, ScalarType::Half,
                                      ScalarType::Double}, {-1, -1});
  const int64_t m = t.size(0), e = t.size(1);
  FUSED_MOE_CHECK(e >= 1, op, ": gating_output must have at least one expert column, got shape ",
                  shape_str(t));
  FUSED_MOE_CHECK(topk >= 1 && topk <= e, op, ": topk must be in [1, num_experts=", e,
                  "], got ", topk);
  if (bias) {
    Arg{op, "e_score_correction_bias", *bias}.expect({ScalarType::Float}, {e}, &t,
                                                     "gating_output");
  }
  if (num_expert_group > 0) {
    FUSED_MOE_CHECK(e % num_expert_group == 0, op, ": num_expert_group=", num_expert_group,
                    " must divide num_experts=", e);
    FUSED_MOE_CHECK(topk_group >= 1 && topk_group <= num_expert_group, op,
                    ": topk_group must be in [1, num_expert_group=", num_expert_group,
                    "], got ", topk_group);
    FUSED_MOE_CHECK(topk <= topk_group * (e / num_expert_group), op, ": topk=", topk,
                    " exceeds the experts in the kept groups (topk_group * num_experts / "
                    "num_expert_group = ", topk_group * (e / num_expert_group), ")");
  } else {
    FUSED_MOE_CHECK(num_expert_group == 0, op, ": num_expert_group must be >= 0, got ",
                    num_expert_group);
  }
  TopkParams p;
  p.scoring = parse_scoring(op, scoring_func);
  Tensor weights = alloc(t, {m, topk}, ScalarType::Float);
  Tensor ids = alloc(t, {m, topk}, ScalarType::Int);
  p.logits = t.data_ptr();
  p.logits_dtype = t.scalar_type();
  p.bias = ptr<const float>(bias);
  p.weights = ptr<float>(weights);
  p.ids = ptr<int32_t>(ids);
  p.num_tokens = m;
  p.num_experts = static_cast<int>(e);
  p.topk = static_cast<int>(topk);
  p.renormalize = renormalize;
  p.num_groups = static_cast<int>(num_expert_group);
  p.topk_group = static_cast<int>(topk_group);
  p.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  if (m == 0) return {weights, ids};
  if (t.is_cuda()) {
    OnDevice d(t);
    cuda::topk(p, d.stream);
  } else {
    cpu::topk(p);
  }
  return {weights, ids};
}

std::tuple<Tensor, Tensor, Tensor> permute(Tensor hidden_states, Tensor topk_ids,
                                           int64_t num_local_experts, OptTensor expert_map,
                                           OptTensor row_weights) {
  const char* op = "fused_moe.permute";
  const Tensor t = rows_in_place(hidden_states);
  topk_ids = dense(topk_ids);
  if (expert_map) expert_map = dense(*expert_map);
  if (row_weights) row_weights = dense(*row_weights);
  Arg{op, "hidden_states", t}.expect(kFloats, {-1, -1});
  const int64_t m = t.size(0), h = t.size(1);
  Arg{op, "topk_ids", topk_ids}.expect(kIds, {m, -1}, &t, "hidden_states");
  const int64_t k = topk_ids.size(1);
  FUSED_MOE_CHECK(num_local_experts >= 1, op, ": num_local_experts must be >= 1, got ",
                  num_local_experts);
  int64_t num_experts = num_local_experts;
  if (expert_map) {
    Arg{op, "expert_map", *expert_map}.expect({ScalarType::Int}, {-1}, &t, "hidden_states");
    num_experts = expert_map->size(0);
    Arg{op, "expert_map", *expert_map}.values_in(-1, num_local_experts);
  }
  if (row_weights) {
    Arg{op, "row_weights", *row_weights}.expect({ScalarType::Float}, {m, k}, &t,
                                                "hidden_states");
  }
  Arg{op, "topk_ids", topk_ids}.values_in(0, num_experts);

  Tensor out = alloc(t, {m * k, h});
  Tensor offsets = alloc(t, {num_local_experts + 1}, ScalarType::Int);
  Tensor inv = alloc(t, {m, k}, ScalarType::Int);
  PermuteParams p;
  p.x = t.data_ptr();
  p.x_stride = t.stride(0);
  p.dtype = t.scalar_type();
  p.topk_ids = expert_ids(topk_ids);
  p.expert_map = ptr<const int32_t>(expert_map);
  p.row_weights = ptr<const float>(row_weights);
  p.out = out.data_ptr();
  p.expert_offsets = ptr<int32_t>(offsets);
  p.inv_index = ptr<int32_t>(inv);
  p.num_tokens = m;
  p.hidden = h;
  p.topk = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  p.num_local_experts = static_cast<int>(num_local_experts);
  if (t.is_cuda()) {
    OnDevice d(t);
    Tensor ws = workspace(t, cuda::permute_workspace_bytes(p));
    cuda::permute(p, ws.data_ptr(), d.stream);
  } else {
    cpu::permute(p);
  }
  return {out, offsets, inv};
}

Tensor grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets, OptTensor bias) {
  const char* op = "fused_moe.grouped_gemm";
  a = rows_in_place(a);
  w = rows_in_place(w);
  expert_offsets = dense(expert_offsets);
  if (bias) bias = dense(*bias);
  Arg{op, "a", a}.expect(kFloats, {-1, -1});
  const int64_t rows = a.size(0), k = a.size(1);
  Arg{op, "w", w}.expect({a.scalar_type()}, {-1, -1, k}, &a, "a");
  const int64_t e = w.size(0), n = w.size(1);
  Arg{op, "expert_offsets", expert_offsets}.expect({ScalarType::Int}, {e + 1}, &a, "a");
  if (bias) {
    Arg{op, "bias", *bias}.expect({a.scalar_type()}, {e, n}, &a, "a");
  }
  Arg{op, "expert_offsets", expert_offsets}.values_in(0, rows + 1, /*rising_from_lo=*/true);
  Tensor out = alloc(a, {rows, n});
  GroupedGemmParams p;
  p.a = a.data_ptr();
  p.a_stride = a.stride(0);
  p.dtype = a.scalar_type();
  p.w = w.data_ptr();
  p.w_expert_stride = w.stride(0);
  p.w_row_stride = w.stride(1);
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.expert_offsets = ptr<const int32_t>(expert_offsets);
  p.out = out.data_ptr();
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.num_experts = static_cast<int>(e);
  if (rows == 0) return out;
  if (a.is_cuda()) {
    OnDevice d(a);
    Tensor ws = workspace(a, cuda::grouped_gemm_workspace_bytes(p));
    cuda::grouped_gemm(p, ws.data_ptr(), d.stream);
  } else {
    cpu::grouped_gemm(p);
  }
  return out;
}

Tensor activation(Tensor x, std::string activation, bool is_act_and_mul) {
  const char* op = "fused_moe.activation";
  x = dense(x);
  Arg{op, "x", x}.expect(kFloats, {-1, -1});
  const int64_t rows = x.size(0), cols = x.size(1);
  FUSED_MOE_CHECK(!is_act_and_mul || cols % 2 == 0, op,
                  ": x must have an even number of columns (gate and up) when is_act_and_mul, got ",
                  shape_str(x));
  ActivationParams p;
  p.act = parse_activation(op, activation, is_act_and_mul);
  p.gated = is_act_and_mul;
  p.inter = is_act_and_mul ? cols / 2 : cols;
  p.rows = rows;
  p.dtype = x.scalar_type();
  Tensor out = alloc(x, {rows, p.inter});
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  if (rows == 0 || p.inter == 0) return out;
  if (x.is_cuda()) {
    OnDevice d(x);
    cuda::activation(p, d.stream);
  } else {
    cpu::activation(p);
  }
  return out;
}

Tensor unpermute(Tensor y, Tensor inv_index, OptTensor topk_weights) {
  const char* op = "fused_moe.unpermute";
  y = dense(y);
  inv_index = dense(inv_index);
  if (topk_weights) topk_weights = dense(*topk_weights);
  Arg{op, "y", y}.expect(kFloats, {-1, -1});
  Arg{op, "inv_index", inv_index}.expect({ScalarType::Int}, {-1, -1}, &y, "y");
  const int64_t m = inv_index.size(0), k = inv_index.size(1), h = y.size(1);
  if (topk_weights) {
    Arg{op, "topk_weights", *topk_weights}.expect({ScalarType::Float}, {m, k}, &y, "y");
  }
  Arg{op, "inv_index", inv_index}.values_in(-1, y.size(0));
  Tensor out = alloc(y, {m, h});
  UnpermuteParams p;
  p.y = y.data_ptr();
  p.dtype = y.scalar_type();
  p.rows = y.size(0);
  p.inv_index = ptr<const int32_t>(inv_index);
  p.weights = ptr<const float>(topk_weights);
  p.out = out.data_ptr();
  p.num_tokens = m;
  p.hidden = h;
  p.topk = static_cast<int>(k);
  if (m == 0 || h == 0) return out;
  if (y.is_cuda()) {
    OnDevice d(y);
    cuda::unpermute(p, d.stream);
  } else {
    cpu::unpermute(p);
  }
  return out;
}

Tensor fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights,
                     Tensor topk_ids, std::string activation_name, bool is_act_and_mul,
                     OptTensor w13_bias, OptTensor w2_bias, OptTensor expert_map,
                     int64_t global_num_experts, bool apply_router_weight_on_input) {
  const char* op = "fused_moe.fused_experts";
  hidden_states = rows_in_place(hidden_states);
  w13 = rows_in_place(w13);
  w2 = rows_in_place(w2);
  topk_weights = dense(topk_weights);
  topk_ids = dense(topk_ids);
  for (OptTensor* t : {&w13_bias, &w2_bias, &expert_map})
    if (*t) *t = dense(**t);
  Arg{op, "hidden_states", hidden_states}.expect(kFloats, {-1, -1});
  const int64_t m = hidden_states.size(0), h = hidden_states.size(1);
  const ScalarType dtype = hidden_states.scalar_type();
  Arg{op, "w13", w13}.expect({dtype}, {-1, -1, h}, &hidden_states, "hidden_states");
  const int64_t e_local = w13.size(0);
  const int64_t inter = is_act_and_mul ? w13.size(1) / 2 : w13.size(1);
  FUSED_MOE_CHECK(!is_act_and_mul || w13.size(1) % 2 == 0, op,
                  ": w13 must have 2 * intermediate_size rows when is_act_and_mul, got shape ",
                  shape_str(w13));
  Arg{op, "w2", w2}.expect({dtype}, {e_local, h, inter}, &hidden_states, "hidden_states");
  // Checked in full here (the ops below check them again) because the decode
  // path reads them directly.
  Arg{op, "topk_weights", topk_weights}.expect({ScalarType::Float}, {m, -1}, &hidden_states,
                                               "hidden_states");
  Arg{op, "topk_ids", topk_ids}.expect(kIds, {m, topk_weights.size(1)},
                                       &hidden_states, "hidden_states");
  if (w13_bias)
    Arg{op, "w13_bias", *w13_bias}.expect({dtype}, {e_local, w13.size(1)}, &hidden_states,
                                          "hidden_states");
  if (w2_bias)
    Arg{op, "w2_bias", *w2_bias}.expect({dtype}, {e_local, h}, &hidden_states, "hidden_states");
  if (expert_map)
    Arg{op, "expert_map", *expert_map}.expect({ScalarType::Int}, {-1}, &hidden_states,
                                              "hidden_states");
  const int64_t mapped = expert_map ? expert_map->size(0) : e_local;
  FUSED_MOE_CHECK(global_num_experts < 0 || global_num_experts == mapped, op,
                  ": global_num_experts=", global_num_experts, " must be -1 or ",
                  expert_map ? "expert_map.size(0)=" : "w13.size(0)=", mapped);
  FUSED_MOE_CHECK(topk_ids.size(1) <= mapped, op, ": topk=", topk_ids.size(1),
                  " exceeds the number of experts ", mapped);
  FUSED_MOE_CHECK(!apply_router_weight_on_input || topk_ids.size(1) == 1, op,
                  ": apply_router_weight_on_input needs topk == 1, got topk=", topk_ids.size(1));
  const Activation activation_kind = parse_activation(op, activation_name, is_act_and_mul);
  if (m > 0) {
    DecodeParams p;
    p.x = hidden_states.data_ptr();
    p.x_stride = hidden_states.stride(0);
    p.dtype = dtype;
    p.w13 = w13.data_ptr();
    p.w13_expert_stride = w13.stride(0);
    p.w13_row_stride = w13.stride(1);
    p.w2 = w2.data_ptr();
    p.w2_expert_stride = w2.stride(0);
    p.w2_row_stride = w2.stride(1);
    p.w13_bias = ptr<const void>(w13_bias);
    p.w2_bias = ptr<const void>(w2_bias);
    p.topk_weights = ptr<const float>(topk_weights);
    p.topk_ids = expert_ids(topk_ids);
    p.expert_map = ptr<const int32_t>(expert_map);
    p.num_tokens = m;
    p.hidden = h;
    p.inter = inter;
    p.topk = static_cast<int>(topk_ids.size(1));
    p.num_experts = static_cast<int>(mapped);
    p.num_local_experts = static_cast<int>(e_local);
    p.activation = activation_kind;
    p.gated = is_act_and_mul;
    p.weight_on_input = apply_router_weight_on_input;
    if (!hidden_states.is_cuda()) {
      // The ranges permute checks on the composed path.
      if (expert_map) Arg{op, "expert_map", *expert_map}.values_in(-1, e_local);
      Arg{op, "topk_ids", topk_ids}.values_in(0, mapped);
      Tensor act = alloc(hidden_states, {m * p.topk, inter});
      Tensor y = alloc(hidden_states, {m * p.topk, h});
      Tensor out = alloc(hidden_states, {m, h});
      p.act = act.data_ptr();
      p.y = y.data_ptr();
      p.out = out.data_ptr();
      cpu::fused_experts(p);
      return out;
    }
    if (cuda::decode_applies(p)) {
      Tensor act = alloc(hidden_states, {m * p.topk, inter});
      Tensor out = alloc(hidden_states, {m, h});
      p.act = act.data_ptr();
      p.out = out.data_ptr();
      OnDevice d(hidden_states);
      cuda::decode(p, d.stream);
      return out;
    }
  }

  // The router weight scales either the gathered input rows or the expert outputs.
  OptTensor on_input, on_output;
  (apply_router_weight_on_input ? on_input : on_output) = topk_weights;
  auto [rows, offsets, inv] = permute(hidden_states, topk_ids, e_local, expert_map, on_input);
  Tensor h13 = grouped_gemm(rows, w13, offsets, w13_bias);
  Tensor act = activation(h13, activation_name, is_act_and_mul);
  Tensor y = grouped_gemm(act, w2, offsets, w2_bias);
  return unpermute(y, inv, on_output);
}

}  // namespace fused_moe
