// Activations: act(gate) * up on [R, 2I] rows (gate/up halves, or interleaved
// for swigluoai), or act(x) on [R, I]. Each thread computes packs of P outputs
// in a grid-stride loop; the formulas are activation_math.h, shared with the CPU.
#include <algorithm>

#include "activation_math.h"
#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // fills any current GPU; then threads loop

template <Activation A, bool Gated, typename T, int P>
__global__ void __launch_bounds__(kThreads)
    activation_kernel(const T* __restrict__ x, int64_t x_stride, T* __restrict__ out, int64_t rows,
                      int64_t inter) {
  const int64_t row_packs = inter / P, total = rows * row_packs;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  // (row, pack) of idx, stepped without a 64-bit division per pack.
  const int64_t stride_rows = stride / row_packs, stride_packs = stride - stride_rows * row_packs;
  int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t r = idx / row_packs, pack = idx - r * row_packs;
  for (; idx < total; idx += stride) {
    const int64_t c = pack * P;  // first output column
    Pack<T, P> y;
    if constexpr (!Gated) {
      const Pack<T, P> v = load_pack<T, P>(x + r * x_stride + c);
#pragma unroll
      for (int q = 0; q < P; ++q) y.e[q] = from_float<T>(act<A>(to_float(v.e[q])));
    } else if constexpr (A == Activation::kSwigluOai) {
      // Interleaved (g0, u0, g1, u1, ...): outputs c..c+P-1 read 2P inputs.
      const T* in = x + r * x_stride + 2 * c;
      const Pack<T, P> lo = load_pack<T, P>(in), hi = load_pack<T, P>(in + P);
      float v[2 * P];
#pragma unroll
      for (int q = 0; q < P; ++q) v[q] = to_float(lo.e[q]), v[P + q] = to_float(hi.e[q]);
#pragma unroll
      for (int q = 0; q < P; ++q) y.e[q] = from_float<T>(gated_act<A>(v[2 * q], v[2 * q + 1]));
    } else {
      const T* in = x + r * x_stride + c;
      const Pack<T, P> gate = load_pack<T, P>(in), up = load_pack<T, P>(in + inter);
#pragma unroll
      for (int q = 0; q < P; ++q)
        y.e[q] = from_float<T>(gated_act<A>(to_float(gate.e[q]), to_float(up.e[q])));
    }
    store_pack<T, P>(out + idx * P, y);
    r += stride_rows;
    pack += stride_packs;
    if (pack >= row_packs) pack -= row_packs, ++r;
  }
}

template <Activation A, bool Gated, typename T, int P>
void launch(const ActivationParams& p, cudaStream_t stream) {
  const int64_t blocks = std::min(ceil_div(p.rows * (p.inter / P), kThreads), kMaxBlocks);
  activation_kernel<A, Gated, T, P><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), p.x_stride, static_cast<T*>(p.out), p.rows, p.inter);
  check_launch("activation_kernel");
}

// 16-byte packs when a row's I outputs (and so its gate/up halves) and the
// row stride are whole aligned vectors.
template <Activation A, bool Gated, typename T>
void launch_width(const ActivationParams& p, cudaStream_t stream) {
  if ((p.inter * int64_t(sizeof(T))) % 16 == 0 && (p.x_stride * int64_t(sizeof(T))) % 16 == 0 &&
      aligned16(p.x) && aligned16(p.out)) {
    launch<A, Gated, T, kVec<T>>(p, stream);
  } else {
    launch<A, Gated, T, 1>(p, stream);
  }
}

}  // namespace

void activation(const ActivationParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.inter <= 0) return;
  dispatch_float(p.dtype, "activation (CUDA)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_activation(p.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (p.gated) {
        launch_width<A, true, T>(p, stream);
      } else {
        launch_width<A, false, T>(p, stream);
      }
    });
  });
}

}  // namespace fused_moe::cuda
