// Grouped GEMM over expert-sorted rows on the CPU: out[r] = w[e] a[r] + bias[e].
#include <algorithm>
#include <memory>
#include <type_traits>

#include "cpu/fp8.h"
#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

// FP8 operands: each expert's rows and weights dequantized to floats (the
// rows all at once, the weights one expert at a time), then the float tiles.
// rows_to_float(first, count, out) and weights_to_float(e, first, count, out)
// write `count` rows of K floats.
template <typename T, typename Rows, typename Weights>
void dequantized_grouped_gemm(const GroupedGemmParams& p, T* out, const Rows& rows_to_float,
                              const Weights& weights_to_float) {
  const int64_t used = p.expert_offsets[p.num_experts];
  // Default-initialised: every element is written before it is read.
  const std::unique_ptr<float[]> rows(new float[used * p.k]), weights(new float[p.n * p.k]);
  parallel_rows(used, 16, [&](int64_t b, int64_t e) {
    rows_to_float(b, e - b, rows.get() + b * p.k);
  });
  for (int e = 0; e < p.num_experts; ++e) {
    const int32_t begin = p.expert_offsets[e], count = p.expert_offsets[e + 1] - begin;
    if (count == 0) continue;
    parallel_rows(p.n, 16, [&](int64_t b, int64_t end) {
      weights_to_float(e, b, end - b, weights.get() + b * p.k);
    });
    const int32_t offsets[2] = {0, count};
    const GemmShape g = plain_gemm(rows.get() + begin * p.k, weights.get(), p.n, p.k, offsets, 1);
    const T* bias = p.bias ? static_cast<const T*>(p.bias) + e * p.n : nullptr;
    grouped_gemm_store<T, float>(g, bias, out + begin * p.n);
  }
}

// FP8: e4m3fn rows and weights, each times its scale.
template <typename T>
void fp8_grouped_gemm(const GroupedGemmParams& p, T* out) {
  const auto* a = static_cast<const uint8_t*>(p.a);
  const auto* w = static_cast<const uint8_t*>(p.w);
  dequantized_grouped_gemm<T>(
      p, out,
      [&](int64_t first, int64_t count, float* dst) {
        dequantize_rows(a + first * p.a_stride, p.a_stride, count, p.k, p.a_scale, 0, first, dst);
      },
      [&](int e, int64_t first, int64_t count, float* dst) {
        dequantize_rows(w + e * p.w_expert_stride + first * p.w_row_stride, p.w_row_stride, count,
                        p.k, p.w_scale, e, first, dst);
      });
}

// 4-bit weights (weight-only): each expert's weights decoded to T (as the
// GPU rounds them), then T's own tiles on the rows read in place: the 16-bit
// types keep their bf16 dot products and packed panels.
template <typename T>
void packed4_grouped_gemm(const GroupedGemmParams& p, T* out) {
  const T* a = static_cast<const T*>(p.a);
  const auto* w = static_cast<const uint8_t*>(p.w);
  // Default-initialised: every element is decoded before it is read.
  const std::unique_ptr<T[]> weights(new T[p.n * p.k]);
  for (int e = 0; e < p.num_experts; ++e) {
    const int32_t begin = p.expert_offsets[e], count = p.expert_offsets[e + 1] - begin;
    if (count == 0) continue;
    parallel_rows(p.n, 16, [&](int64_t b, int64_t end) {
      dequantize_packed4_rows(w + e * p.w_expert_stride + b * p.w_row_stride, p.w_row_stride,
                              end - b, p.k, p.w4, e, b, weights.get() + b * p.k);
    });
    const int32_t offsets[2] = {0, count};
    GemmShape g = plain_gemm(a + begin * p.a_stride, weights.get(), p.n, p.k, offsets, 1);
    g.a_stride = p.a_stride;
    const T* bias = p.bias ? static_cast<const T*>(p.bias) + e * p.n : nullptr;
    grouped_gemm_store<T>(g, bias, out + begin * p.n);
  }
}

}  // namespace

void grouped_gemm(const GroupedGemmParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(p.out);
    if (p.fp8) {
      fp8_grouped_gemm<T>(p, out);
    } else if (p.w4.kind != Packed4::kNone) {
      if constexpr (!std::is_same_v<T, double>) packed4_grouped_gemm<T>(p, out);  // never double
    } else {
      GemmShape g = plain_gemm(p.a, p.w, p.n, p.k, p.expert_offsets, p.num_experts);
      g.a_stride = p.a_stride;
      g.w_expert_stride = p.w_expert_stride;
      g.w_row_stride = p.w_row_stride;
      grouped_gemm_store<T>(g, static_cast<const T*>(p.bias), out);
    }
    const int64_t used = p.expert_offsets[p.num_experts];
    std::fill(out + used * p.n, out + p.rows * p.n, T(0.0f));
  });
}

}  // namespace fused_moe::cpu
