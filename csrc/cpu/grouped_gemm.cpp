// Grouped GEMM over expert-sorted rows on the CPU: out[r] = w[e] a[r] + bias[e].
#include <algorithm>
#include <vector>

#include "cpu/fp8.h"
#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

// Quantized operands: each expert's rows and weights dequantized to floats
// (the rows all at once, the weights one expert at a time), then the float
// tiles. rows_to_float(first, count, out) and weights_to_float(e, first,
// count, out) write `count` rows of K floats.
template <typename T, typename Rows, typename Weights>
void dequantized_grouped_gemm(const GroupedGemmParams& p, T* out, const Rows& rows_to_float,
                              const Weights& weights_to_float) {
  const int64_t used = p.expert_offsets[p.num_experts];
  std::vector<float> rows(used * p.k), weights(p.n * p.k);
  parallel_rows(used, 16, [&](int64_t b, int64_t e) {
    rows_to_float(b, e - b, rows.data() + b * p.k);
  });
  for (int e = 0; e < p.num_experts; ++e) {
    const int32_t begin = p.expert_offsets[e], count = p.expert_offsets[e + 1] - begin;
    if (count == 0) continue;
    parallel_rows(p.n, 16, [&](int64_t b, int64_t end) {
      weights_to_float(e, b, end - b, weights.data() + b * p.k);
    });
    const int32_t offsets[2] = {0, count};
    const GemmShape g = plain_gemm(rows.data() + begin * p.k, weights.data(), p.n, p.k, offsets, 1);
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

// 4-bit weights (weight-only): the rows of T widened, the weights decoded.
template <typename T>
void packed4_grouped_gemm(const GroupedGemmParams& p, T* out) {
  const T* a = static_cast<const T*>(p.a);
  const auto* w = static_cast<const uint8_t*>(p.w);
  dequantized_grouped_gemm<T>(
      p, out,
      [&](int64_t first, int64_t count, float* dst) {
        for (int64_t r = 0; r < count; ++r)
          widen_row(a + (first + r) * p.a_stride, p.k, dst + r * p.k);
      },
      [&](int e, int64_t first, int64_t count, float* dst) {
        dequantize_packed4_rows(w + e * p.w_expert_stride + first * p.w_row_stride,
                                p.w_row_stride, count, p.k, p.w4, e, first, dst);
      });
}

}  // namespace

void grouped_gemm(const GroupedGemmParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(p.out);
    if (p.fp8) {
      fp8_grouped_gemm<T>(p, out);
    } else if (p.w4.kind != Packed4::kNone) {
      packed4_grouped_gemm<T>(p, out);
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
