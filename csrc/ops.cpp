// Every op's entry point: check the inputs, allocate the outputs, fill the
// kernel parameters and run the CPU or CUDA kernel of the inputs' device.
#include "ops.h"

#include <algorithm>
#include <cstdlib>
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

// Every op takes tensors of any strides. The kernels, CPU and CUDA, read
// row-strided matrices in place (weights [E, N, K], tokens [M, H] and the
// row inputs of quantize_fp8, activation and unpermute): innermost stride 1,
// every other stride a whole number of 16-byte vectors (what TMA and the
// vector loads need; the CPU keeps the same rule). Anything else, and every
// other input (ids, weights of the top-k, scales, biases), is copied once
// into a dense tensor here.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Tensor rows_in_place(const Tensor& t) {
  if (t.dim() < 2 || t.stride(t.dim() - 1) != 1) return dense(t);
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

namespace {

constexpr ScalarType kFp8 = ScalarType::Float8_e4m3fn;

// block_shape (bn, bk) of block scales, {0, 0} when not given.
struct Block {
  int64_t n = 0, k = 0;
  explicit operator bool() const { return n > 0; }
};

Block parse_block(const char* op, const OptInts& block_shape) {
  if (!block_shape) return {};
  const std::vector<int64_t>& b = *block_shape;
  FUSED_MOE_CHECK(b.size() == 2 && b[0] >= 1 && b[1] >= 1, op,
                  ": block_shape must be two positive ints (block_n, block_k), got ", b.size(),
                  " values");
  return {b[0], b[1]};
}

// The scales of an e4m3fn weight [E, N, K]: blocks [E, ceil(N/bn), ceil(K/bk)]
// when block_shape is given, else per channel [E, N] ([E, N, 1]) or per
// tensor [E] ([E, 1], [E, 1, 1]).
ScaleGrid weight_scales(const char* op, const char* name, const Tensor& s, int64_t e, int64_t n,
                        int64_t k, Block b, const Tensor& ref) {
  Arg{op, name, s}.dtype_is(ScalarType::Float);
  Arg{op, name, s}.same_device(ref, "the weights");
  ScaleGrid g;
  g.data = ptr<const float>(s);
  if (b) {
    const int64_t nb = ceil_div(n, b.n), kb = ceil_div(k, b.k);
    Arg{op, name, s}.shape_is({e, nb, kb});
    g.rows_per = b.n, g.cols_per = b.k, g.row_stride = kb, g.expert_stride = nb * kb;
    return g;
  }
  g.cols_per = std::max<int64_t>(k, 1);
  if (s.numel() == e && s.dim() >= 1 && s.size(0) == e) {  // per tensor
    g.rows_per = std::max<int64_t>(n, 1), g.expert_stride = 1;
    return g;
  }
  const bool channel = (s.dim() == 2 || (s.dim() == 3 && s.size(2) == 1)) && s.size(0) == e &&
                       s.size(1) == n;
  FUSED_MOE_CHECK(channel, op, ": ", name, " must be [", e, "] (per tensor) or [", e, ", ", n,
                  "] (per channel), or [", e, ", ceil(", n, "/bn), ceil(", k,
                  "/bk)] with block_shape; got shape ", shape_str(s));
  g.row_stride = 1, g.expert_stride = n;
  return g;
}

// The scales of e4m3fn rows [R, K]: [R, ceil(K/bk)] per row per bk columns
// (with block_shape), [R, 1] per row, or one element per tensor.
ScaleGrid row_scales(const char* op, const char* name, const Tensor& s, int64_t r, int64_t k,
                     Block b, const Tensor& ref) {
  Arg{op, name, s}.dtype_is(ScalarType::Float);
  Arg{op, name, s}.same_device(ref, "the rows");
  ScaleGrid g;
  g.data = ptr<const float>(s);
  g.cols_per = std::max<int64_t>(k, 1);
  if (s.numel() == 1 && s.dim() <= 2) {  // per tensor
    g.rows_per = std::max<int64_t>(r, 1);
    return g;
  }
  const int64_t groups = b ? ceil_div(k, b.k) : 1;
  FUSED_MOE_CHECK(s.dim() == 2 && s.size(0) == r && (s.size(1) == 1 || s.size(1) == groups), op,
                  ": ", name, " must be [", r, ", 1] (per row), one element (per tensor)",
                  b ? " or [R, ceil(K/bk)] = [" + std::to_string(r) + ", " +
                          std::to_string(groups) + "] (per row per block_k)"
                    : std::string(),
                  "; got shape ", shape_str(s));
  g.row_stride = s.size(1);
  if (s.size(1) == groups && b) g.cols_per = b.k;
  return g;
}

constexpr int64_t kMxfp4Group = 32;

bool is_e8m0(ScalarType t) { return t == ScalarType::Byte || t == ScalarType::Float8_e8m0fnu; }

// The scales (and zero points) of a 4-bit weight `w_name` [E, N, K/2], K
// unpacked: mxfp4 when they are e8m0 exponents (uint8 or float8_e8m0fnu, the
// same bytes), int4 with group K / scale.size(-1) when they are floats.
Packed4Scales packed4_scales(const char* op, const char* w_name, const char* s_name,
                             const char* z_name, const OptTensor& s, const OptTensor& z,
                             int64_t e, int64_t n, int64_t k, const Tensor& ref) {
  FUSED_MOE_CHECK(s, op, ": 4-bit (uint8) ", w_name, " needs ", s_name, " (e8m0 exponents [",
                  e, ", ", n, ", K/32] for mxfp4, or bf16/fp16/fp32 [", e, ", ", n,
                  ", K/group] for int4)");
  Arg{op, s_name, *s}.dtype_in({ScalarType::Byte, ScalarType::Float8_e8m0fnu, ScalarType::Float,
                                ScalarType::BFloat16, ScalarType::Half});
  Arg{op, s_name, *s}.same_device(ref, w_name);
  const bool mx = is_e8m0(s->scalar_type());
  FUSED_MOE_CHECK(s->dim() == 3 && s->size(0) == e && s->size(1) == n && s->size(2) >= 1, op,
                  ": ", s_name, " must be [", e, ", ", n, ", K/group] for ", w_name,
                  " of K=", k, " columns, got shape ", shape_str(*s));
  const int64_t groups = s->size(2);
  if (mx) {
    FUSED_MOE_CHECK(groups * kMxfp4Group == k, op, ": ", s_name,
                    " (e8m0, mxfp4) has one exponent per 32 columns: expected [", e, ", ", n,
                    ", K/32] with K=", k, " a multiple of 32, got shape ", shape_str(*s));
    FUSED_MOE_CHECK(!z, op, ": ", z_name, " (zero points) is for int4 weights; ", s_name,
                    " is e8m0 (mxfp4), which has none");
  } else {
    // A group covers whole bytes, so a byte's two codes share scale and zero point.
    FUSED_MOE_CHECK(k % groups == 0 && (k / groups) % 2 == 0, op, ": ", s_name, " has ", groups,
                    " groups a row; the group size K/", groups, " must be a whole even number "
                    "for K=", k);
  }
  if (z) Arg{op, z_name, *z}.expect({ScalarType::Byte}, {e, n, groups}, &ref, w_name);
  Packed4Scales p;
  p.kind = mx ? Packed4::kMxfp4 : Packed4::kInt4;
  p.scale = s->data_ptr();
  p.scale_dtype = mx ? ScalarType::Byte : s->scalar_type();
  p.zero = ptr<const uint8_t>(z);
  p.group = k / groups;
  p.row_stride = groups;
  p.expert_stride = n * groups;
  return p;
}

// K, the unpacked columns of a 4-bit weight: two a byte, so even.
void check_even_k(const char* op, const char* name, const Tensor& t, int64_t k) {
  FUSED_MOE_CHECK(k % 2 == 0, op, ": 4-bit (uint8) weights pack two columns a byte, so ", name,
                  " must have an even number of columns, got shape ", shape_str(t));
}

}  // namespace

Tensor grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets, OptTensor bias, OptTensor a_scale,
                    OptTensor w_scale, OptInts block_shape, std::optional<ScalarType> out_dtype,
                    OptTensor w_zp) {
  const char* op = "fused_moe.grouped_gemm";
  a = rows_in_place(a);
  w = rows_in_place(w);
  expert_offsets = dense(expert_offsets);
  for (OptTensor* t : {&bias, &a_scale, &w_scale, &w_zp})
    if (*t) *t = dense(**t);
  const bool fp8 = a.scalar_type() == kFp8;
  const bool w4 = !fp8 && w.scalar_type() == ScalarType::Byte;
  Arg{op, "a", a}.expect(fp8 ? std::initializer_list<ScalarType>{kFp8} : kFloats, {-1, -1});
  const int64_t rows = a.size(0), k = a.size(1);
  if (w4) {
    check_even_k(op, "a", a, k);
    Arg{op, "w", w}.expect({ScalarType::Byte}, {-1, -1, k / 2}, &a, "a");
  } else {
    Arg{op, "w", w}.expect({a.scalar_type()}, {-1, -1, k}, &a, "a");
  }
  const int64_t e = w.size(0), n = w.size(1);
  const ScalarType dtype = fp8 ? out_dtype.value_or(ScalarType::BFloat16) : a.scalar_type();
  FUSED_MOE_CHECK(!out_dtype || *out_dtype == dtype, op, ": out_dtype applies to fp8 inputs; "
                  "for ", torch::headeronly::toString(dtype), " inputs the output has their dtype");
  FUSED_MOE_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half ||
                      dtype == ScalarType::Float, op,
                  ": out_dtype must be bfloat16, float16 or float32, got ",
                  torch::headeronly::toString(dtype));
  Arg{op, "expert_offsets", expert_offsets}.expect({ScalarType::Int}, {e + 1}, &a, "a");
  if (bias) Arg{op, "bias", *bias}.expect({dtype}, {e, n}, &a, "a");
  GroupedGemmParams p;
  if (fp8) {
    FUSED_MOE_CHECK(a_scale && w_scale, op, ": float8_e4m3fn a and w need a_scale and w_scale (",
                    a_scale ? "w_scale" : "a_scale", " is missing)");
    const Block b = parse_block(op, block_shape);
    p.fp8 = true;
    p.a_scale = row_scales(op, "a_scale", *a_scale, rows, k, b, a);
    p.w_scale = weight_scales(op, "w_scale", *w_scale, e, n, k, b, a);
  } else if (w4) {
    FUSED_MOE_CHECK(!a_scale && !block_shape, op, ": a_scale and block_shape are for "
                    "float8_e4m3fn a and w; 4-bit (uint8) w is weight-only, a stays ",
                    torch::headeronly::toString(a.scalar_type()));
    p.w4 = packed4_scales(op, "w", "w_scale", "w_zp", w_scale, w_zp, e, n, k, a);
  } else {
    FUSED_MOE_CHECK(!a_scale && !w_scale, op, ": a_scale and w_scale are for float8_e4m3fn a "
                    "and w; got ", torch::headeronly::toString(a.scalar_type()), " a");
  }
  FUSED_MOE_CHECK(!w_zp || w4, op, ": w_zp (zero points) is for 4-bit (uint8) int4 w; got ",
                  torch::headeronly::toString(w.scalar_type()), " w");
  Arg{op, "expert_offsets", expert_offsets}.values_in(0, rows + 1, /*rising_from_lo=*/true);
  Tensor out = alloc(a, {rows, n}, dtype);
  p.a = a.data_ptr();
  p.a_stride = a.stride(0);
  p.dtype = dtype;
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

std::tuple<Tensor, Tensor> quantize_fp8(Tensor x, int64_t group_size, OptTensor scale) {
  const char* op = "fused_moe.quantize_fp8";
  x = rows_in_place(x);
  Arg{op, "x", x}.expect(kFloats, {-1, -1});
  const int64_t rows = x.size(0), cols = x.size(1);
  QuantizeParams p;
  std::vector<int64_t> scale_shape{1, 1};
  if (scale) {
    scale = dense(*scale);
    Arg{op, "scale", *scale}.dtype_is(ScalarType::Float);
    Arg{op, "scale", *scale}.same_device(x, "x");
    FUSED_MOE_CHECK(scale->numel() == 1, op, ": a static scale has one element, got shape ",
                    shape_str(*scale));
    p.static_scale = ptr<const float>(scale);
  } else {
    FUSED_MOE_CHECK(group_size >= -1, op, ": group_size must be > 0 (per row per group), 0 (per "
                    "row) or -1 (per tensor), got ", group_size);
    p.per_tensor = group_size == -1;
    if (group_size >= 0) scale_shape = {rows, group_size > 0 ? ceil_div(cols, group_size) : 1};
  }
  Tensor q = alloc(x, {rows, cols}, kFp8);
  Tensor scales = alloc(x, scale_shape, ScalarType::Float);
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.dtype = x.scalar_type();
  p.q = ptr<uint8_t>(q);
  p.scales = ptr<float>(scales);
  p.rows = rows;
  p.cols = cols;
  p.group = group_size > 0 && !scale ? group_size : std::max<int64_t>(cols, 1);
  if (x.is_cuda()) {
    OnDevice d(x);
    Tensor ws = workspace(x, cuda::quantize_fp8_workspace_bytes(p));
    cuda::quantize_fp8(p, ws.data_ptr(), d.stream);
  } else {
    cpu::quantize_fp8(p);
  }
  return {q, scales};
}

Tensor activation(Tensor x, std::string activation, bool is_act_and_mul) {
  const char* op = "fused_moe.activation";
  x = rows_in_place(x);
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
  p.x_stride = x.stride(0);
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
  y = rows_in_place(y);
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
  p.y_stride = y.stride(0);
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

namespace {

// How fused_experts quantizes the inputs of its GEMMs: quantize_fp8's
// group_size (block_k with block scales; per row with per_act_token_quant;
// else per tensor, or the static a13_scale / a2_scale when given); and the
// checked scales, for the decode kernels, which read them directly.
struct FusedFp8 {
  int64_t group_size = 0;
  ScaleGrid w13, w2;
  const float* a13 = nullptr;
  const float* a2 = nullptr;
};

const float* static_scale(const char* op, const char* name, const OptTensor& s, const Tensor& x) {
  if (!s) return nullptr;
  Arg{op, name, *s}.dtype_is(ScalarType::Float);
  Arg{op, name, *s}.same_device(x, "hidden_states");
  FUSED_MOE_CHECK(s->numel() == 1, op, ": ", name, " is one static scale (one element), got shape ",
                  shape_str(*s), " (take the max over experts of per-expert input scales)");
  return ptr<const float>(s);
}

FusedFp8 fused_fp8(const char* op, bool fp8, const OptTensor& w13_scale, const OptTensor& w2_scale,
                   const OptTensor& a13_scale, const OptTensor& a2_scale,
                   const OptInts& block_shape, bool per_act_token_quant, const Tensor& x,
                   const Tensor& w13, const Tensor& w2) {
  if (!fp8) {
    FUSED_MOE_CHECK(!w13_scale && !w2_scale && !a13_scale && !a2_scale && !block_shape, op,
                    ": w13_scale, w2_scale, a13_scale, a2_scale and block_shape are for "
                    "float8_e4m3fn weights; w13 is not float8_e4m3fn");
    return {};
  }
  FUSED_MOE_CHECK(w13_scale, op, ": float8_e4m3fn w13 needs w13_scale");
  FUSED_MOE_CHECK(w2_scale, op, ": float8_e4m3fn w2 needs w2_scale");
  FUSED_MOE_CHECK(!a13_scale == !a2_scale, op, ": static activation scales come in pairs: ",
                  a13_scale ? "a2_scale" : "a13_scale", " is missing");
  const Block b = parse_block(op, block_shape);
  FUSED_MOE_CHECK(!(b && (a13_scale || per_act_token_quant)), op,
                  ": block_shape quantizes activations per token per block_k; a13_scale/a2_scale "
                  "and per_act_token_quant do not apply");
  FUSED_MOE_CHECK(!(a13_scale && per_act_token_quant), op,
                  ": per_act_token_quant is dynamic; a13_scale/a2_scale are static scales");
  FusedFp8 f;
  f.group_size = b ? b.k : per_act_token_quant ? 0 : -1;
  const int64_t e = w13.size(0), h = w13.size(2), i = w2.size(2);
  f.w13 = weight_scales(op, "w13_scale", *w13_scale, e, w13.size(1), h, b, x);
  f.w2 = weight_scales(op, "w2_scale", *w2_scale, e, h, i, b, x);
  f.a13 = static_scale(op, "a13_scale", a13_scale, x);
  f.a2 = static_scale(op, "a2_scale", a2_scale, x);
  return f;
}

}  // namespace

// The composed chain of fused_experts (permute, grouped GEMM, activation,
// grouped GEMM, unpermute) on a run of tokens, each intermediate released as
// soon as the next step has read it: the caching allocator then gives its
// memory to the step after, so a call's peak is two intermediates, not four.
struct Chain {
  const std::string& activation_name;
  bool is_act_and_mul, on_input, fp8;
  ScalarType dtype;
  const FusedFp8& quant;
  const OptInts& block_shape;
  int64_t e_local;
  const OptTensor& expert_map;
  const Tensor &w13, &w2;
  const OptTensor &w13_s, &w2_s, &w13_z, &w2_z, &a13_s, &a2_s, &w13_bias, &w2_bias;

  // FP8: each GEMM's input quantized as the scheme says; 4-bit weights: their
  // scales and zero points (none for float weights).
  Tensor gemm(Tensor& x, const Tensor& offsets, const Tensor& w, const OptTensor& w_scale,
              const OptTensor& w_zp, const OptTensor& static_scale, const OptTensor& bias) const {
    if (!fp8) {
      Tensor y = grouped_gemm(x, w, offsets, bias, {}, w_scale, {}, {}, w_zp);
      x = Tensor();
      return y;
    }
    auto [q, scales] = quantize_fp8(x, quant.group_size, static_scale);
    x = Tensor();
    return grouped_gemm(q, w, offsets, bias, scales, w_scale, block_shape, dtype, {});
  }

  Tensor operator()(Tensor x, Tensor topk_weights, Tensor topk_ids) const {
    // The router weight scales either the gathered input rows or the expert outputs.
    OptTensor weights_in, weights_out;
    (on_input ? weights_in : weights_out) = topk_weights;
    auto [rows, offsets, inv] = permute(x, topk_ids, e_local, expert_map, weights_in);
    Tensor h13 = gemm(rows, offsets, w13, w13_s, w13_z, a13_s, w13_bias);
    Tensor act = activation(h13, activation_name, is_act_and_mul);
    h13 = Tensor();
    Tensor y = gemm(act, offsets, w2, w2_s, w2_z, a2_s, w2_bias);
    return unpermute(y, inv, weights_out);
  }
};

// Tokens a run of the chain takes: past them, fused_experts runs the chain
// on runs of this many tokens, so that its intermediates stay within a
// budget for any batch: FUSED_MOE_CHAIN_BYTES (default 2 GiB, and never
// fewer than 8192 tokens a run, so no batch up to 8192 is split) over the
// bytes a token's top-k rows hold at the chain's peak (a step's input and
// output intermediates).
int64_t chain_tokens(int64_t topk, int64_t h, int64_t n13, int64_t inter, int64_t element) {
  const char* env = std::getenv("FUSED_MOE_CHAIN_BYTES");
  const bool set = env && *env;
  const int64_t budget = set ? std::max<int64_t>(1, std::atoll(env)) : int64_t(2) << 30;
  const int64_t per_token = topk * element * std::max({h + n13, n13 + inter, inter + h});
  const int64_t tokens = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_token));
  return set ? tokens : std::max<int64_t>(8192, tokens);
}

Tensor fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights,
                     Tensor topk_ids, std::string activation_name, bool is_act_and_mul,
                     OptTensor w13_bias, OptTensor w2_bias, OptTensor expert_map,
                     int64_t global_num_experts, bool apply_router_weight_on_input,
                     OptTensor w13_scale, OptTensor w2_scale, OptTensor a13_scale,
                     OptTensor a2_scale, OptInts block_shape, bool per_act_token_quant,
                     OptTensor w13_zp, OptTensor w2_zp) {
  const char* op = "fused_moe.fused_experts";
  hidden_states = rows_in_place(hidden_states);
  const bool fp8 = w13.scalar_type() == kFp8;
  const bool w4 = w13.scalar_type() == ScalarType::Byte;
  w13 = rows_in_place(w13);
  w2 = rows_in_place(w2);
  topk_weights = dense(topk_weights);
  topk_ids = dense(topk_ids);
  for (OptTensor* t : {&w13_bias, &w2_bias, &expert_map})
    if (*t) *t = dense(**t);
  Arg{op, "hidden_states", hidden_states}.expect(kFloats, {-1, -1});
  const int64_t m = hidden_states.size(0), h = hidden_states.size(1);
  const ScalarType dtype = hidden_states.scalar_type();
  const ScalarType w_dtype = fp8 ? kFp8 : w4 ? ScalarType::Byte : dtype;
  if (w4) check_even_k(op, "hidden_states", hidden_states, h);
  // The weights' last dimension: K, or K/2 bytes when 4-bit.
  auto packed = [&](int64_t k) { return w4 ? k / 2 : k; };
  Arg{op, "w13", w13}.expect({w_dtype}, {-1, -1, packed(h)}, &hidden_states, "hidden_states");
  const int64_t e_local = w13.size(0);
  const int64_t inter = is_act_and_mul ? w13.size(1) / 2 : w13.size(1);
  FUSED_MOE_CHECK(!is_act_and_mul || w13.size(1) % 2 == 0, op,
                  ": w13 must have 2 * intermediate_size rows when is_act_and_mul, got shape ",
                  shape_str(w13));
  if (w4) check_even_k(op, "w2 (its intermediate_size)", w2, inter);
  Arg{op, "w2", w2}.expect({w_dtype}, {e_local, h, packed(inter)}, &hidden_states,
                           "hidden_states");
  // Dense copies as locals: the arguments themselves stay as the caller gave them.
  auto dense_opt = [](const OptTensor& t) { return t ? OptTensor(dense(*t)) : OptTensor(); };
  const OptTensor w13_s = dense_opt(w13_scale), w2_s = dense_opt(w2_scale);
  const OptTensor a13_s = dense_opt(a13_scale), a2_s = dense_opt(a2_scale);
  const OptTensor w13_z = dense_opt(w13_zp), w2_z = dense_opt(w2_zp);
  FusedFp8 quant;
  if (w4) {
    FUSED_MOE_CHECK(!a13_s && !a2_s && !block_shape && !per_act_token_quant, op,
                    ": a13_scale, a2_scale, block_shape and per_act_token_quant are for "
                    "float8_e4m3fn weights; 4-bit (uint8) weights are weight-only, activations "
                    "stay ", torch::headeronly::toString(dtype));
    packed4_scales(op, "w13", "w13_scale", "w13_zp", w13_s, w13_z, e_local, w13.size(1), h,
                   hidden_states);
    packed4_scales(op, "w2", "w2_scale", "w2_zp", w2_s, w2_z, e_local, h, inter, hidden_states);
  } else {
    FUSED_MOE_CHECK(!w13_z && !w2_z, op, ": w13_zp and w2_zp (zero points) are for 4-bit "
                    "(uint8) int4 weights; w13 is ",
                    torch::headeronly::toString(w13.scalar_type()));
    quant = fused_fp8(op, fp8, w13_s, w2_s, a13_s, a2_s, block_shape, per_act_token_quant,
                      hidden_states, w13, w2);
  }
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
  // 4-bit weights (and FP8 on the CPU) take the composed chain: its grouped
  // GEMMs dequantize one expert at a time.
  if (m > 0 && !w4 && (hidden_states.is_cuda() || !fp8)) {
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
    p.fp8 = fp8;
    p.w13_scale = quant.w13;
    p.w2_scale = quant.w2;
    // Columns per activation scale: block_k, or a whole row (of x and of act); -1 per tensor.
    p.act_group = quant.group_size == 0 ? std::max(h, inter) : quant.group_size;
    p.a13_static = quant.a13;
    p.a2_static = quant.a2;
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

  const Chain chain{activation_name, is_act_and_mul, apply_router_weight_on_input, fp8, dtype,
                    quant, block_shape, e_local, expert_map, w13, w2, w13_s, w2_s, w13_z, w2_z,
                    a13_s, a2_s, w13_bias, w2_bias};
  const int64_t n13 = w13.size(1);
  const int64_t chunk = chain_tokens(topk_ids.size(1), h, n13, inter, hidden_states.element_size());
  if (m <= chunk) return chain(hidden_states, topk_weights, topk_ids);
  Tensor out = alloc(hidden_states, {m, h});
  for (int64_t t0 = 0; t0 < m; t0 += chunk) {
    const int64_t n = std::min(chunk, m - t0);
    Tensor rows = torch::stable::narrow(out, 0, t0, n);
    torch::stable::copy_(rows, chain(torch::stable::narrow(hidden_states, 0, t0, n),
                                     torch::stable::narrow(topk_weights, 0, t0, n),
                                     torch::stable::narrow(topk_ids, 0, t0, n)));
  }
  return out;
}

}  // namespace fused_moe
