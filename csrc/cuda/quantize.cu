// FP8 (e4m3fn) quantization of rows: one warp per (row, group of columns)
// finds the group's amax and writes its scale and e4m3 values, reading the
// group twice (the second time from L1/L2). Per tensor, a first pass takes
// the amax of every row into one word (an atomic max: order-free, so the
// result is the same bits on every run).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/fp8.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// P e4m3 bytes, stored as one access.
template <int P>
struct alignas(P) Bytes {
  uint8_t e[P];
};

// The warp's amax of n elements from x, P at a time.
template <typename T, int P>
__device__ float warp_amax(const T* x, int64_t n, int lane) {
  float m = 0.0f;
  for (int64_t i = int64_t(lane) * P; i < n; i += 32 * P) {
    const Pack<T, P> v = load_pack<T, P>(x + i);
#pragma unroll
    for (int q = 0; q < P; ++q) m = fmaxf(m, fabsf(to_float(v.e[q])));
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, d));
  return m;
}

template <typename T, int P>
__device__ void warp_quantize(const T* x, int64_t n, float scale, uint8_t* q, int lane) {
  for (int64_t i = int64_t(lane) * P; i < n; i += 32 * P) {
    const Pack<T, P> v = load_pack<T, P>(x + i);
    Bytes<P> out;
#pragma unroll
    for (int j = 0; j < P; ++j) out.e[j] = fp8_quantize(to_float(v.e[j]), scale);
    *reinterpret_cast<Bytes<P>*>(q + i) = out;
  }
}

// Per tensor: *amax = max over every row (as the bits of a non-negative float).
template <typename T, int P>
__global__ void __launch_bounds__(kThreads) amax_kernel(QuantizeParams p, unsigned* amax) {
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;
  const float m = warp_amax<T, P>(static_cast<const T*>(p.x) + row * p.x_stride, p.cols, lane);
  if (lane == 0) atomicMax(amax, __float_as_uint(m));
}

// One warp per (row, group); `shared`: the per-tensor amax bits or the static
// scale (then written to scales[0]), null for scales per group.
template <typename T, int P>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeParams p, const unsigned* amax) {
  const int64_t groups = ceil_div(p.cols, p.group);
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  float scale = 0.0f;
  if (p.static_scale) scale = *p.static_scale;
  else if (amax) scale = fp8_scale_of(__uint_as_float(*amax));
  if ((p.static_scale || amax) && blockIdx.x == 0 && threadIdx.x == 0) p.scales[0] = scale;
  if (warp >= p.rows * groups) return;
  const int64_t r = warp / groups, c0 = warp % groups * p.group;
  const int64_t n = min(p.group, p.cols - c0);
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride + c0;
  if (!p.static_scale && !amax) {
    scale = fp8_scale_of(warp_amax<T, P>(x, n, lane));
    if (lane == 0) p.scales[warp] = scale;
  }
  warp_quantize<T, P>(x, n, scale, p.q + r * p.cols + c0, lane);
}

template <typename T, int P>
void launch(const QuantizeParams& p, void* workspace, cudaStream_t stream) {
  unsigned* amax = nullptr;
  if (p.per_tensor && !p.static_scale) {
    amax = static_cast<unsigned*>(workspace);
    check_cuda(cudaMemsetAsync(amax, 0, sizeof(unsigned), stream), "quantize_fp8: cudaMemsetAsync");
    if (p.rows > 0) {
      amax_kernel<T, P><<<grid_size(ceil_div(p.rows, kWarps), "quantize_fp8"), kThreads, 0,
                          stream>>>(p, amax);
      check_launch("quantize_fp8: amax_kernel");
    }
  }
  const int64_t warps = p.rows * ceil_div(p.cols, p.group);
  const int64_t blocks = std::max<int64_t>(1, ceil_div(warps, kWarps));  // one writes scales[0]
  quantize_kernel<T, P><<<grid_size(blocks, "quantize_fp8"), kThreads, 0, stream>>>(p, amax);
  check_launch("quantize_fp8: quantize_kernel");
}

}  // namespace

size_t quantize_fp8_workspace_bytes(const QuantizeParams& p) {
  return p.per_tensor && !p.static_scale ? 256 : 0;
}

void quantize_fp8(const QuantizeParams& p, void* workspace, cudaStream_t stream) {
  dispatch_float(p.dtype, "quantize_fp8 (CUDA)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    // 16-byte loads where every group and row starts on one.
    const bool packed = p.group % V == 0 && p.cols % V == 0 && p.x_stride % V == 0 && aligned16(p.x);
    if (packed) launch<T, V>(p, workspace, stream);
    else launch<T, 1>(p, workspace, stream);
  });
}

}  // namespace fused_moe::cuda
