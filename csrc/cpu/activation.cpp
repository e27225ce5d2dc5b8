// Gated and plain activations on the CPU.
#include "activation_math.h"
#include "cpu/common.h"

namespace fused_moe::cpu {
namespace {

template <Activation A, typename T>
void activation_rows(const ActivationParams& p, int64_t b, int64_t end) {
  const int64_t n = p.inter;
  for (int64_t r = b; r < end; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
    T* out = static_cast<T*>(p.out) + r * n;
    for (int64_t i = 0; i < n; ++i) {
      float v;
      if (!p.gated) {
        v = act<A>(static_cast<float>(x[i]));
      } else if (A == Activation::kSwigluOai) {  // gate/up interleaved
        v = gated_act<A>(static_cast<float>(x[2 * i]), static_cast<float>(x[2 * i + 1]));
      } else {
        v = gated_act<A>(static_cast<float>(x[i]), static_cast<float>(x[n + i]));
      }
      out[i] = static_cast<T>(v);
    }
  }
}

}  // namespace

void activation(const ActivationParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_activation(p.act, [&](auto a) {
      parallel_rows(p.rows, 64, [&](int64_t b, int64_t e) {
        activation_rows<decltype(a)::value, T>(p, b, e);
      });
    });
  });
}

}  // namespace fused_moe::cpu
