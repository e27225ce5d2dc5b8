// Grouped GEMM over expert-sorted rows on the CPU: out[r] = w[e] a[r] + bias[e].
#include <algorithm>
#include <vector>

#include "cpu/fp8.h"
#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

// FP8: each expert's rows and weights dequantized to floats (the rows all
// at once, the weights one expert at a time), then the float tiles.
template <typename T>
void fp8_grouped_gemm(const GroupedGemmParams& p, T* out) {
  const auto* a = static_cast<const uint8_t*>(p.a);
  const auto* w = static_cast<const uint8_t*>(p.w);
  const int64_t used = p.expert_offsets[p.num_experts];
  std::vector<float> rows(used * p.k), weights(p.n * p.k);
  parallel_rows(used, 16, [&](int64_t b, int64_t e) {
    dequantize_rows(a + b * p.a_stride, p.a_stride, e - b, p.k, p.a_scale, 0, b,
                    rows.data() + b * p.k);
  });
  for (int e = 0; e < p.num_experts; ++e) {
    const int32_t begin = p.expert_offsets[e], count = p.expert_offsets[e + 1] - begin;
    if (count == 0) continue;
    const uint8_t* w_e = w + e * p.w_expert_stride;
    parallel_rows(p.n, 16, [&](int64_t b, int64_t end) {
      dequantize_rows(w_e + b * p.w_row_stride, p.w_row_stride, end - b, p.k, p.w_scale, e, b,
                      weights.data() + b * p.k);
    });
    const int32_t offsets[2] = {0, count};
    const GemmShape g = plain_gemm(rows.data() + begin * p.k, weights.data(), p.n, p.k, offsets, 1);
    const T* bias = p.bias ? static_cast<const T*>(p.bias) + e * p.n : nullptr;
    grouped_gemm_store<T, float>(g, bias, out + begin * p.n);
  }
}

}  // namespace

void grouped_gemm(const GroupedGemmParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(p.out);
    if (p.fp8) {
      fp8_grouped_gemm<T>(p, out);
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
