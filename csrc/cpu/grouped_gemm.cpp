// Grouped GEMM over expert-sorted rows on the CPU: out[r] = w[e] a[r] + bias[e].
#include <algorithm>
#include <vector>

#include "cpu/common.h"

namespace fused_moe::cpu {
namespace {

template <typename T>
void gemm_rows(const GroupedGemmParams& p, int e, int64_t r0, int64_t r1) {
  const int64_t n = p.n, k = p.k;
  const T* w = static_cast<const T*>(p.w) + e * n * k;
  const T* bias = p.bias ? static_cast<const T*>(p.bias) + e * n : nullptr;
  std::vector<float> a(k);
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = static_cast<const T*>(p.a) + r * k;
    for (int64_t i = 0; i < k; ++i) a[i] = static_cast<float>(src[i]);
    T* out = static_cast<T*>(p.out) + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const T* wj = w + j * k;
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += a[i] * static_cast<float>(wj[i]);
      if (bias) acc += static_cast<float>(bias[j]);
      out[j] = static_cast<T>(acc);
    }
  }
}

}  // namespace

void grouped_gemm(const GroupedGemmParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int32_t* off = p.expert_offsets;
    for (int e = 0; e < p.num_experts; ++e) {
      parallel_rows(off[e + 1] - off[e], 4, [&](int64_t b, int64_t end) {
        gemm_rows<T>(p, e, off[e] + b, off[e] + end);
      });
    }
    T* out = static_cast<T*>(p.out);
    std::fill(out + int64_t(off[p.num_experts]) * p.n, out + p.rows * p.n, T(0.0f));
  });
}

}  // namespace fused_moe::cpu
