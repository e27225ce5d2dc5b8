// Grouped GEMM over expert-sorted rows on the CPU: out[r] = w[e] a[r] + bias[e].
#include <algorithm>

#include "cpu/gemm.h"

namespace fused_moe::cpu {

void grouped_gemm(const GroupedGemmParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const GemmShape g = plain_gemm(p.a, p.w, p.n, p.k, p.expert_offsets, p.num_experts);
    T* out = static_cast<T*>(p.out);
    grouped_gemm_store<T>(g, static_cast<const T*>(p.bias), out);
    const int64_t used = p.expert_offsets[p.num_experts];
    std::fill(out + used * p.n, out + p.rows * p.n, T(0.0f));
  });
}

}  // namespace fused_moe::cpu
