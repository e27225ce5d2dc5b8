// The parameters of every kernel, device-neutral: raw pointers, sizes, enums.
//
// ops.cpp checks the tensors, allocates the outputs and fills one of these
// structs; cpu/cpu_kernels.h and cuda/launch.h declare the functions that
// take them. Shapes are in the comments. Tensors are row-major; the ones with
// a stride field below may be row-strided views (strides in elements, 16-byte
// multiples where not dense), on the CPU as on CUDA; all others are dense.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include <torch/headeronly/core/ScalarType.h>

#if defined(__CUDACC__)
#define FUSED_MOE_HD __host__ __device__ __forceinline__
#else
#define FUSED_MOE_HD inline
#endif

namespace fused_moe {

using torch::headeronly::ScalarType;

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };

enum class Activation : int { kSilu = 0, kGelu, kGeluTanh, kRelu2, kSwigluOai };

// swigluoai constants (gpt-oss): out = (clamp(up, -L, L) + 1) * g * sigmoid(A * g),
// g = min(gate, L).
constexpr float kSwigluAlpha = 1.702f;
constexpr float kSwigluLimit = 7.0f;

// Expert ids as users hold them: int32 (fused_moe.topk) or int64
// (torch.topk, Hugging Face routers), read in place. An id outside int32's
// range reads as -1, which every kernel treats as a slot on another rank.
struct ExpertIds {
  const void* data = nullptr;  // [M, K]
  bool is_int64 = false;

  FUSED_MOE_HD int operator[](int64_t i) const {
    if (!is_int64) return static_cast<const int32_t*>(data)[i];
    const int64_t id = static_cast<const int64_t*>(data)[i];
    return id >= 0 && id <= std::numeric_limits<int32_t>::max() ? static_cast<int>(id) : -1;
  }
};

struct TopkParams {
  const void* logits = nullptr;  // [M, E], logits_dtype
  ScalarType logits_dtype = ScalarType::Float;
  const float* bias = nullptr;   // [E] or null: added for selection only
  float* weights = nullptr;      // [M, K] out
  int32_t* ids = nullptr;        // [M, K] out, best first, ties to the lower id
  int64_t num_tokens = 0;        // M
  int num_experts = 0;           // E
  int topk = 0;                  // K
  Scoring scoring = Scoring::kSoftmax;
  bool renormalize = true;
  int num_groups = 0;            // 0: no grouped top-k; else divides E
  int topk_group = 0;            // groups kept when num_groups > 0
  float routed_scaling_factor = 1.0f;
};

struct PermuteParams {
  const void* x = nullptr;             // [M, H] tokens
  int64_t x_stride = 0;                // between rows of x
  ScalarType dtype = ScalarType::Float;
  ExpertIds topk_ids;                  // [M, K] global expert ids
  const int32_t* expert_map = nullptr; // [E_global] global -> local id or -1; null: identity
  const float* row_weights = nullptr;  // [M, K] or null: each gathered row is scaled by it
  void* out = nullptr;                 // [M*K, H]: local slots sorted by (local expert, t*K+k),
                                       // then zero rows for the non-local slots
  int32_t* expert_offsets = nullptr;   // [E_local + 1]: rows of expert e are [off[e], off[e+1])
  int32_t* inv_index = nullptr;        // [M, K]: row of slot (t, k) in out, -1 if not local
  int64_t num_tokens = 0;              // M
  int64_t hidden = 0;                  // H
  int topk = 0;                        // K
  int num_experts = 0;                 // E_global: ids outside [0, E_global) are not local
  int num_local_experts = 0;           // E_local
};

// The scale of element (i, j) of a quantized matrix (x = q * scale), or of
// expert e's weight (i, j): data[e * expert_stride + (i / rows_per) *
// row_stride + j / cols_per]. Blocks (bn, bk); per row: cols_per >= cols;
// one per tensor (or expert): rows_per >= rows too, row_stride 0.
struct ScaleGrid {
  const float* data = nullptr;
  int64_t rows_per = 1, cols_per = 1;
  int64_t row_stride = 0;
  int64_t expert_stride = 0;

  FUSED_MOE_HD float at(int64_t e, int64_t i, int64_t j) const {
    return data[e * expert_stride + i / rows_per * row_stride + j / cols_per];
  }
};

// FP8 (e4m3fn) quantization of rows: q = saturate(x / scale) to +-448, one
// scale per row per `group` columns (group >= cols: per row), or one for
// all rows (per_tensor), max(amax, 1e-10) / 448 of what it covers; or the
// static scale given.
struct QuantizeParams {
  const void* x = nullptr;               // [R, C]
  int64_t x_stride = 0;                  // between rows of x
  ScalarType dtype = ScalarType::Float;  // of x
  uint8_t* q = nullptr;                  // [R, C] e4m3fn
  float* scales = nullptr;               // [R, ceil(C / group)], or [1] per tensor
  const float* static_scale = nullptr;   // [1] or null: dynamic
  int64_t rows = 0;                      // R
  int64_t cols = 0;                      // C
  int64_t group = 0;                     // columns per scale; >= C: per row
  bool per_tensor = false;
};

constexpr float kFp8Max = 448.0f;
constexpr float kScaleEps = 1e-10f;

// 4-bit weights (DESIGN.md's table): w is uint8 [E, N, K/2], two codes a
// byte along K, the even k in the low nibble; one scale (and, for int4, one
// zero point) per `group` columns of a row. mxfp4: value = e2m1(code) *
// 2^(e8m0 - 127) (scales are e8m0 bytes, group 32); int4: value = (code -
// zero) * scale (scales of scale_dtype: Float, BFloat16 or Half; zero 8
// when there are no zero points). value() is the one formula, CPU and CUDA.
enum class Packed4 : int { kNone = 0, kMxfp4, kInt4 };

struct Packed4Scales {
  Packed4 kind = Packed4::kNone;
  const void* scale = nullptr;            // [E, N, K / group]
  ScalarType scale_dtype = ScalarType::Byte;
  const uint8_t* zero = nullptr;          // int4: [E, N, K / group] codes 0..15, or null
  int64_t group = 32;
  int64_t row_stride = 0;                 // K / group
  int64_t expert_stride = 0;              // N * K / group

  // Scale i as stored: the e8m0 byte, or the float32/bfloat16/float16 bits. A
  // load only, so kernels can keep it in flight and convert it later.
  FUSED_MOE_HD uint32_t scale_bits_at(int64_t i) const {
    if (kind == Packed4::kMxfp4) return static_cast<const uint8_t*>(scale)[i];
    if (scale_dtype == ScalarType::Float) return static_cast<const uint32_t*>(scale)[i];
    return static_cast<const uint16_t*>(scale)[i];
  }

  // The scale of stored bits x (scale_bits_at).
  FUSED_MOE_HD float scale_of_bits(uint32_t x) const {
    if (kind == Packed4::kMxfp4) {
      // 2^(x - 127) by its bits (x = 0: the subnormal 2^-127), exact and without ldexpf.
      if (x == 255) return __builtin_nanf("");
      return bits_to_float(x == 0 ? 0x00400000u : x << 23);
    }
    switch (scale_dtype) {
      case ScalarType::Float: return bits_to_float(x);
      case ScalarType::BFloat16: return bits_to_float(x << 16);
      default: return half_to_float(static_cast<uint16_t>(x));
    }
  }

  FUSED_MOE_HD float scale_at(int64_t i) const { return scale_of_bits(scale_bits_at(i)); }

  // Group g (columns g * group ..) of row n of expert e: its scale and zero
  // point, read once by kernels that decode a whole group (a 16-entry table).
  FUSED_MOE_HD int64_t group_index(int64_t e, int64_t n, int64_t g) const {
    return e * expert_stride + n * row_stride + g;
  }
  FUSED_MOE_HD float scale_of_group(int64_t e, int64_t n, int64_t g) const {
    return scale_at(group_index(e, n, g));
  }
  FUSED_MOE_HD int zero_of_group(int64_t e, int64_t n, int64_t g) const {
    return zero ? zero[group_index(e, n, g)] : 8;
  }

  // The value of `code` in a group of scale `s` and zero point `z` (z unused for mxfp4).
  FUSED_MOE_HD float code_value(int code, float s, int z) const {
    if (kind == Packed4::kMxfp4) {
      constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
      const float v = kE2m1[code & 7];
      return (code & 8 ? -v : v) * s;
    }
    return static_cast<float>(code - z) * s;
  }

  // Element (n, k) of expert e, whose 4-bit code is `code`.
  FUSED_MOE_HD float value(int64_t e, int64_t n, int64_t k, int code) const {
    const int64_t g = k / group;
    return code_value(code, scale_of_group(e, n, g), zero_of_group(e, n, g));
  }

  FUSED_MOE_HD static float bits_to_float(uint32_t bits) {
    float f;
    __builtin_memcpy(&f, &bits, sizeof(f));
    return f;
  }

  // IEEE half to float (normals, subnormals, inf, NaN), without a half type.
  FUSED_MOE_HD static float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
    const float sub = static_cast<float>(man) * (1.0f / 16777216.0f);  // man * 2^-24
    return sign ? -sub : sub;
  }
};

struct GroupedGemmParams {
  const void* a = nullptr;               // [R, K] rows sorted by expert
  ScalarType dtype = ScalarType::Float;  // of a, w, bias and out; of bias and out when fp8
  bool fp8 = false;                      // a and w e4m3fn, scaled by a_scale and w_scale
  ScaleGrid a_scale;                     // fp8: of a (rows R, columns K)
  ScaleGrid w_scale;                     // fp8: of w[e] (rows N, columns K)
  Packed4Scales w4;                      // 4-bit w (kind != kNone): w uint8 [E, N, K/2]
  int64_t a_stride = 0;                  // between rows of a
  const void* w = nullptr;               // [E, N, K]
  int64_t w_expert_stride = 0;           // between experts of w
  int64_t w_row_stride = 0;              // between rows (N) of an expert
  const void* bias = nullptr;            // [E, N] or null
  const int32_t* expert_offsets = nullptr;  // [E + 1], off[0] = 0, off[E] <= R
  void* out = nullptr;                   // [R, N]: out[r] = w[e] a[r] + bias[e]; rows >= off[E] are 0
  int64_t rows = 0;                      // R
  int64_t n = 0;                         // N
  int64_t k = 0;                         // K
  int num_experts = 0;                   // E
  bool zero_tail = true;                 // false: rows >= off[E] left alone (a call on the
                                         // first experts of a larger one)
};

struct ActivationParams {
  const void* x = nullptr;   // [R, 2I] when gated, else [R, I]
  int64_t x_stride = 0;      // between rows of x
  ScalarType dtype = ScalarType::Float;
  void* out = nullptr;       // [R, I]
  int64_t rows = 0;          // R
  int64_t inter = 0;         // I
  Activation act = Activation::kSilu;
  bool gated = true;         // act(gate) * up; gate = x[:, :I], up = x[:, I:]
                             // (swigluoai: gate = x[:, 0::2], up = x[:, 1::2])
};

struct UnpermuteParams {
  const void* y = nullptr;            // [R, H] expert outputs in permuted order
  int64_t y_stride = 0;               // between rows of y
  ScalarType dtype = ScalarType::Float;
  int64_t rows = 0;                   // R
  const int32_t* inv_index = nullptr; // [M, K], -1 (or >= R): slot contributes nothing
  const float* weights = nullptr;     // [M, K] or null: unit weights
  void* out = nullptr;                // [M, H]: sum over k in order 0..K-1, fp32 accumulate
  int64_t num_tokens = 0;             // M
  int64_t hidden = 0;                 // H
  int topk = 0;                       // K
};

// A whole fused_experts call: the CPU kernel (cpu/experts.cpp) at any batch,
// the two CUDA kernels of cuda/decode.cu for a few tokens (larger batches on
// the GPU compose permute, grouped_gemm, activation, unpermute).
struct DecodeParams {
  const void* x = nullptr;             // [M, H]
  int64_t x_stride = 0;                // between rows of x
  ScalarType dtype = ScalarType::Float;  // of x, the weights, the biases, act and out
  const void* w13 = nullptr;           // [E_local, 2I, H] gated, else [E_local, I, H]
  const void* w2 = nullptr;            // [E_local, H, I]
  int64_t w13_expert_stride = 0, w13_row_stride = 0;  // as GroupedGemmParams' w
  int64_t w2_expert_stride = 0, w2_row_stride = 0;
  const void* w13_bias = nullptr;      // [E_local, 2I or I] or null
  const void* w2_bias = nullptr;       // [E_local, H] or null
  const float* topk_weights = nullptr; // [M, K]
  ExpertIds topk_ids;                  // [M, K] global expert ids
  const int32_t* expert_map = nullptr; // [E_global] global -> local id or -1; null: identity
  void* act = nullptr;                 // [M*K, I] scratch: the activations of every slot
  void* y = nullptr;                   // [M*K, H] scratch (CPU): every slot's expert output
  void* out = nullptr;                 // [M, H]
  int64_t num_tokens = 0;              // M
  int64_t hidden = 0;                  // H
  int64_t inter = 0;                   // I
  int topk = 0;                        // K
  int num_experts = 0;                 // E_global: ids outside [0, E_global) are not local
  int num_local_experts = 0;           // E_local
  Activation activation = Activation::kSilu;
  bool gated = true;                   // as ActivationParams::gated
  bool weight_on_input = false;        // topk_weights scale x (K == 1) instead of the outputs
  // FP8: w13, w2 e4m3 (w = q * scale); each GEMM's input quantized per row per
  // act_group columns (>= the row: per row), or with the static scale a*_static.
  bool fp8 = false;
  ScaleGrid w13_scale, w2_scale;
  int64_t act_group = 0;
  const float* a13_static = nullptr;
  const float* a2_static = nullptr;
};

}  // namespace fused_moe
