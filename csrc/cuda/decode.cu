// fused_experts for a few tokens (decode): two kernels that read each slot's
// expert weights straight from topk_ids, in place of the permute -> GEMM ->
// activation -> GEMM -> unpermute chain.
//
// With about one token per expert both GEMMs are matrix-vector products bound
// by the weight read; the chain's seven launches (two of them setup kernels)
// then cost as much as streaming the weights does. Here:
//   up_kernel:   act[s][i] = act(w13[e_s] x_t + b13[e_s])[i]     s = t*K + k
//   down_kernel: out[t] = sum over k = 0..K-1 of w[t,k] * (w2[e_k] act[t*K+k] + b2[e_k])
// Each warp streams its weight rows in stages of 16-byte packs, the next
// stage's loads in flight while the current one is multiplied; grids are
// sized to one wave of resident blocks; on sm_90 down_kernel is a
// programmatic dependent launch, so its prologue and first weight loads
// overlap up_kernel's tail. Two slots on one expert read its weights twice,
// so fused_experts takes this path only when that is cheap (decode_applies).
//
// Rounding follows the chain: GEMM outputs are rounded to T before the
// activation and before the weighted sum, which adds in slot order with
// separate multiply and add, as unpermute does.
//
// FP8 weights (W = e4m3): each pack of 16 is widened in registers and its
// partial sum times its weight scale; the staged x and activations are
// quantized and dequantized in shared memory as the chain's quantize_fp8
// would quantize them, so both paths compute the same scheme.
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "activation_math.h"
#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 2;    // weight rows a warp streams together
// Packs per row per lane in one stage; two stages are in flight (the next
// loads while the current multiplies): 16 packs, 256 bytes a lane.
constexpr int kUnroll = 4;
constexpr int kDefaultSmem = 48 * 1024;  // more needs the kernel's opt-in
constexpr double kMaxSlotBytes = 400e6;  // see decode_applies

// 16 bytes of weights as a stage holds them: a pack of 16-bit elements, or
// four words of e4m3 (an array of 16 bytes would take 16 registers).
template <typename W>
using WeightPack = std::conditional_t<std::is_same_v<W, uint8_t>, uint4, Pack<W, kVec<W>>>;

// Weights are read once: keep them out of L1.
template <typename T>
__device__ __forceinline__ WeightPack<T> load_streaming(const T* p) {
  static_assert(sizeof(WeightPack<T>) == 16);
  uint4 raw;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(p));
  if constexpr (std::is_same_v<WeightPack<T>, uint4>) {
    return raw;
  } else {
    WeightPack<T> r;
    memcpy(&r, &raw, sizeof(r));
    return r;
  }
}

// Element q of a pack as a float. bf16 widens by a shift or a mask of its
// 32-bit word, so a pack stays in 4 registers rather than being split into
// 16-bit halves first.
template <typename T, int P>
__device__ __forceinline__ float element(const Pack<T, P>& x, int q) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    uint32_t words[P / 2];
    memcpy(words, &x, sizeof(words));
    return __uint_as_float(q % 2 ? words[q / 2] & 0xffff0000u : words[q / 2] << 16);
  } else {
    return to_float(x.e[q]);
  }
}

// e4m3 weights [h, h + 8) of a pack as floats, two per conversion.
__device__ __forceinline__ void widen_fp8_half(const uint4& w, int h, float (&f)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t word = words[h / 4 + i / 2];
    const auto pair = static_cast<__nv_fp8x2_storage_t>(i % 2 ? word >> 16 : word & 0xffffu);
    const float2 v = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}

// x rounded through e4m3 at `scale` (quantize_fp8's rounding), as a float.
__device__ __forceinline__ float fp8_round_trip(float x, float scale) {
  const float y = fminf(fmaxf(__fdiv_rn(x, scale), -kFp8Max), kFp8Max);
  const __half h = __half(__nv_cvt_fp8_to_halfraw(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3),
                                                  __NV_E4M3));
  return __half2float(h) * scale;
}

// Rows [0, rows) of v (`n` floats each, rows `ld` apart, in shared memory)
// quantized and dequantized in place, by the block: one scale per row per
// `group` columns, or `fixed` (a static scale) for all. Rows with keep(r)
// false are left alone.
template <typename Keep>
__device__ void fake_quantize(float* v, int rows, int64_t n, int64_t ld, int64_t group,
                              const float* fixed, Keep keep) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t per_row = fixed ? 1 : ceil_div(n, group), len = fixed ? n : group;
  for (int64_t g = warp; g < rows * per_row; g += kWarps) {
    const int r = int(g / per_row);
    if (!keep(r)) continue;
    float* x = v + r * ld + (g % per_row) * len;
    const int64_t m = min(len, n - (g % per_row) * len);
    float scale;
    if (fixed) {
      scale = *fixed;
    } else {
      float amax = 0.0f;
      for (int64_t i = lane; i < m; i += 32) amax = fmaxf(amax, fabsf(x[i]));
#pragma unroll
      for (int d = 16; d > 0; d /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, d));
      scale = fmaxf(amax, kScaleEps) / kFp8Max;
    }
    for (int64_t i = lane; i < m; i += 32) x[i] = fp8_round_trip(x[i], scale);
  }
}

// Elements [i, i + P) of a vector in shared memory, as floats.
template <int P>
__device__ __forceinline__ void vector_at(const float* v, int64_t i, float (&out)[P]) {
#pragma unroll
  for (int q = 0; q < P; q += 4) {
    const float4 f = *reinterpret_cast<const float4*>(v + i + q);
    out[q] = f.x, out[q + 1] = f.y, out[q + 2] = f.z, out[q + 3] = f.w;
  }
}
template <int P, typename T>
__device__ __forceinline__ void vector_at(const T* v, int64_t i, float (&out)[P]) {
  const Pack<T, P> x = *reinterpret_cast<const Pack<T, P>*>(v + i);
#pragma unroll
  for (int q = 0; q < P; ++q) out[q] = element(x, q);
}

// The block's store(i, pack i of src) for the packs i < n that keep(i),
// loads issued kUnroll at a time so that their latencies overlap.
template <typename T, typename Keep, typename Store>
__device__ __forceinline__ void copy_packs(const T* src, int n, Keep keep, Store store) {
  constexpr int P = kVec<T>;
  for (int i0 = threadIdx.x; i0 < n; i0 += kThreads * kUnroll) {
    Pack<T, P> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      if (i < n && keep(i)) v[u] = load_pack<T, P>(src + int64_t(i) * P);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      if (i < n && keep(i)) store(i, v[u]);
    }
  }
}

// Programmatic dependent launch (sm_90): down_kernel is launched while
// up_kernel still runs, and waits for it only where it reads act.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}


// One lane's share of a stage: kUnroll packs of each of the kRows rows (and
// with FP8 their scales, loaded with them so that no load waits in the
// multiply loop).
template <typename W>
struct Stage {
  WeightPack<W> w[kUnroll][kRows];
  float scale[kUnroll][kRows];
};

// The warp's dot products of `jobs` groups of kRows weight rows with vectors
// in shared memory, streamed so that one stage's loads are in flight while
// the previous one is multiplied, across job boundaries too.
//   rows(j, row):   fills row[r], the r-th weight row of job j
//   stage():        fills the shared memory; called once by every warp (it
//                   may sync the block) after the first weight loads are
//                   issued, so that they overlap it
//   vec(j, r):      the shared-memory vector (float or T) row r multiplies
//   done(j, sums):  the job's kRows sums, reduced over the warp (every lane)
//   scales(j, srow): FP8 weights (W = uint8_t, e4m3): srow[r], the scales of
//                   row r of job j, one per 2^scale_shift columns (at least
//                   16: a pack's scale is the one of its first column);
//                   called by every lane
// Weight rows are `packs` 16-byte packs long; vectors as many elements.
template <typename W, typename Rows, typename Staging, typename Vec, typename Done, typename Scales>
__device__ __forceinline__ void stream_dots(int jobs, int packs, int lane, Rows rows,
                                            Staging stage, Vec vec, Done done, Scales scales,
                                            int scale_shift) {
  constexpr int P = kVec<W>, U = kUnroll, kStep = 32 * U;
  constexpr bool kFp8 = std::is_same_v<W, uint8_t>;
  const int chunks = (packs + kStep - 1) / kStep, steps = jobs * chunks;
  auto load = [&](Stage<W>& s, int step) {
    const int j = step / chunks, p0 = lane + (step - j * chunks) * kStep;
    const W* row[kRows];
    rows(j, row);
    const float* srow[kRows] = {};
    if constexpr (kFp8) scales(j, srow);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (p0 + 32 * u < packs) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          s.w[u][r] = load_streaming(row[r] + (p0 + 32 * u) * P);
          if constexpr (kFp8) s.scale[u][r] = srow[r][((p0 + 32 * u) * P) >> scale_shift];
        }
      }
    }
  };
  float acc[kRows] = {};
  auto consume = [&](const Stage<W>& s, int step) {
    const int j = step / chunks, c = step - j * chunks, p0 = lane + c * kStep;
    decltype(vec(0, 0)) v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) v[r] = vec(j, r);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (p0 + 32 * u >= packs) break;
      const int64_t col = int64_t(p0 + 32 * u) * P;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if constexpr (kFp8) {
          // In two halves of 8, which keeps the widened weights and the
          // vector's floats to the registers of a 16-bit pack.
          float part = 0.0f;
#pragma unroll
          for (int h = 0; h < P; h += 8) {
            float x[8], w[8];
            vector_at<8>(v[r], col + h, x);
            widen_fp8_half(s.w[u][r], h, w);
#pragma unroll
            for (int q = 0; q < 8; ++q) part = fmaf(w[q], x[q], part);
          }
          acc[r] = fmaf(part, s.scale[u][r], acc[r]);
        } else {
          float x[P];
          vector_at<P>(v[r], col, x);
#pragma unroll
          for (int q = 0; q < P; ++q) acc[r] = fmaf(element(s.w[u][r], q), x[q], acc[r]);
        }
      }
    }
    if (c != chunks - 1) return;
    auto plus = [](float x, float y) { return x + y; };
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = seg_reduce<32>(acc[r], plus);
    done(j, acc);
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  };
  Stage<W> a, b;
  if (steps > 0) load(a, 0);
  stage();
  for (int step = 0; step < steps; step += 2) {
    if (step + 1 < steps) load(b, step + 1);
    consume(a, step);
    if (step + 1 >= steps) break;
    if (step + 2 < steps) load(a, step + 2);
    consume(b, step + 1);
  }
}

// log2 of the elements per scale along an extent of n: 31 when one scale
// covers it all, -1 when not a power of two of at least `least` (see
// fp8_fits). Shifts, because a 64-bit division is a call that spills.
__host__ __device__ inline int shift_of(int64_t per, int64_t n, int least) {
  if (per >= n) return 31;
  int shift = 0;
  while (shift < 31 && (int64_t(1) << shift) < per) ++shift;
  return (int64_t(1) << shift) == per && per >= least ? shift : -1;
}

// Columns per weight scale (a pack of 16 lies within one) in rows of `cols`.
__host__ __device__ inline int scale_shift(const ScaleGrid& s, int64_t cols) {
  return shift_of(s.cols_per, cols, 16);
}

// The scales of expert e's weight row `row` of `rows`, one per s.cols_per columns.
__device__ __forceinline__ const float* scale_row(const ScaleGrid& s, int e, int64_t row,
                                                  int64_t rows) {
  return s.data + e * s.expert_stride + (row >> shift_of(s.rows_per, rows, 1)) * s.row_stride;
}

template <typename T>
__device__ __forceinline__ float bias_of(const void* bias, int64_t i) {
  return bias ? to_float(static_cast<const T*>(bias)[i]) : 0.0f;
}

// A GEMM output as the chain stores it: acc + bias rounded to T.
template <typename T>
__device__ __forceinline__ float rounded(float acc, const void* bias, int64_t i) {
  return to_float(from_float<T>(acc + bias_of<T>(bias, i)));
}

// Block (x, s): output columns [x * kWarps * J * C, +kWarps * J * C) of
// act[s]; a warp's J jobs are C columns each: 1 gated (its gate and up rows),
// 2 plain. x[t] (scaled by the router weight and rounded to T, as the chain's
// gathered row) is staged in shared memory as floats.
template <typename T, typename W, Activation A, bool Gated>
__global__ void __launch_bounds__(kThreads, 2) up_kernel(DecodeParams p, int jobs_per_warp) {
  constexpr int C = Gated ? 1 : kRows, P = kVec<T>;
  constexpr bool kFp8 = std::is_same_v<W, uint8_t>;
  extern __shared__ float4 smem[];
  float* x = reinterpret_cast<float*>(smem);
  allow_dependent_launch();
  const int64_t slot = blockIdx.y, H = p.hidden, I = p.inter;
  const int e = local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local_experts);
  if (e < 0) return;  // whole block: a slot of another rank is never read
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = (int64_t(blockIdx.x) * kWarps + warp) * jobs_per_warp * C;
  const int64_t left = (I - first + C - 1) / C;  // columns from `first` on, in jobs
  const int jobs = static_cast<int>(max(int64_t(0), min(int64_t(jobs_per_warp), left)));
  // w13 row r of job j: the gate (r = 0) and up (r = 1) of column col when
  // gated, else columns col and col + 1 (the last column again past I).
  auto row_of = [&](int j, int r) -> int64_t {
    const int64_t col = first + j * C;
    if constexpr (!Gated) return min(col + r, I - 1);
    else if constexpr (A == Activation::kSwigluOai) return 2 * col + r;  // interleaved
    else return r * I + col;
  };
  const int64_t n13 = Gated ? 2 * I : I;
  const W* w13 = static_cast<const W*>(p.w13) + int64_t(e) * p.w13_expert_stride;
  const void* bias = p.w13_bias;
  const int64_t b = int64_t(e) * n13;
  T* out = static_cast<T*>(p.act) + slot * I;
  stream_dots<W>(
      jobs, static_cast<int>(H / kVec<W>), lane,
      [&](int j, const W** row) {
        for (int r = 0; r < kRows; ++r) row[r] = w13 + row_of(j, r) * p.w13_row_stride;
      },
      [&] {
        const float scale = p.weight_on_input ? p.topk_weights[slot] : 1.0f;
        copy_packs(
            static_cast<const T*>(p.x) + slot / p.topk * p.x_stride, static_cast<int>(H / P),
            [](int) { return true; },
            [&](int i, const Pack<T, P>& v) {
#pragma unroll
              for (int q = 0; q < P; ++q)
                x[i * P + q] = to_float(from_float<T>(to_float(v.e[q]) * scale));
            });
        __syncthreads();
        if constexpr (kFp8) {
          fake_quantize(x, 1, H, H, p.act_group, p.a13_static, [](int) { return true; });
          __syncthreads();
        }
      },
      [&](int, int) { return x; },
      [&](int j, const float* sums) {
        if (lane != 0) return;
        const int64_t col = first + j * C;
        if constexpr (Gated) {
          out[col] = from_float<T>(gated_act<A>(rounded<T>(sums[0], bias, b + row_of(j, 0)),
                                                rounded<T>(sums[1], bias, b + row_of(j, 1))));
        } else {
          for (int c = 0; c < C && col + c < I; ++c)
            out[col + c] = from_float<T>(act<A>(rounded<T>(sums[c], bias, b + row_of(j, c))));
        }
      },
      [&](int j, const float** srow) {
        for (int r = 0; r < kRows; ++r) srow[r] = scale_row(p.w13_scale, e, row_of(j, r), n13);
      },
      scale_shift(p.w13_scale, p.hidden));
}

// Block (x, t): out columns [x * kWarps * J, +kWarps * J) of token t, J
// consecutive ones a warp. The token's activations (its K rows of act, local
// slots only) are staged in shared memory. Lane k holds slot k's expert and
// weight; a column's jobs take the local slots two at a time in slot order,
// the order of the weighted sum.
// FP8: the activations are staged as floats, to be quantized in place.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads, 2) down_kernel(DecodeParams p, int cols_per_warp) {
  constexpr int P = kVec<T>;
  constexpr bool kFp8 = std::is_same_v<W, uint8_t>;
  using Staged = std::conditional_t<kFp8, float, T>;
  extern __shared__ float4 smem[];
  Staged* act = reinterpret_cast<Staged*>(smem);
  const int64_t t = blockIdx.y, H = p.hidden, I = p.inter;
  const int K = p.topk, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int e = -1;
  float weight = 1.0f;
  if (lane < K) {
    e = local_expert(p.topk_ids[t * K + lane], p.expert_map, p.num_experts, p.num_local_experts);
    if (!p.weight_on_input) weight = p.topk_weights[t * K + lane];
  }
  const unsigned local = __ballot_sync(kFullMask, e >= 0);
  const int slots = __popc(local), pairs = (slots + 1) / 2;
  const int64_t first = (int64_t(blockIdx.x) * kWarps + warp) * cols_per_warp;
  const int cols = static_cast<int>(max(int64_t(0), min(int64_t(cols_per_warp), H - first)));
  // Lane i holds the i-th local slot; job j is column first + j / pairs and
  // the local slots 2i and 2i + 1 of i = j % pairs (the same one twice for a
  // lone last slot, whose row is then streamed twice, from L2 the second time).
  const int ranked = lane < slots ? __fns(local, 0, lane + 1) : 0;
  auto slot = [&](int j, int r) {
    const int i = 2 * (j % pairs) + r;
    return __shfl_sync(kFullMask, ranked, i < slots ? i : i - 1);
  };
  const W* w2 = static_cast<const W*>(p.w2);
  auto row_of = [&](int j, int k) {
    return w2 + int64_t(__shfl_sync(kFullMask, e, k)) * p.w2_expert_stride +
           (first + j / pairs) * p.w2_row_stride;
  };
  float sum = 0.0f;
  auto add = [&](int64_t col, int k, float dot) {  // separate multiply and add, as unpermute
    const int ek = __shfl_sync(kFullMask, e, k);
    const float y = rounded<T>(dot, p.w2_bias, int64_t(ek) * H + col);
    sum = __fadd_rn(sum, __fmul_rn(__shfl_sync(kFullMask, weight, k), y));
  };
  stream_dots<W>(
      cols * pairs, static_cast<int>(I / kVec<W>), lane,
      [&](int j, const W** row) {
        row[0] = row_of(j, slot(j, 0));
        row[1] = row_of(j, slot(j, 1));
      },
      [&] {
        wait_for_prior_kernel();  // act is up_kernel's output
        const int row_packs = static_cast<int>(I / P);
        copy_packs(
            static_cast<const T*>(p.act) + t * K * I, K * row_packs,
            // Slots of other ranks have no activations.
            [&](int i) { return (local >> (i / row_packs)) & 1; },
            [&](int i, const Pack<T, P>& v) {
              if constexpr (kFp8) {
#pragma unroll
                for (int q = 0; q < P; ++q) act[int64_t(i) * P + q] = to_float(v.e[q]);
              } else {
                *reinterpret_cast<Pack<T, P>*>(act + int64_t(i) * P) = v;
              }
            });
        __syncthreads();
        if constexpr (kFp8) {
          fake_quantize(act, K, I, I, p.act_group, p.a2_static,
                        [&](int k) { return (local >> k) & 1; });
          __syncthreads();
        }
      },
      [&](int j, int r) { return act + int64_t(slot(j, r)) * I; },
      [&](int j, const float* sums) {
        const int64_t col = first + j / pairs;
        const int a = slot(j, 0), b = slot(j, 1);
        add(col, a, sums[0]);
        if (b != a) add(col, b, sums[1]);
        if (j % pairs == pairs - 1) {  // the column's last job
          if (lane == 0) static_cast<T*>(p.out)[t * H + col] = from_float<T>(sum);
          sum = 0.0f;
        }
      },
      [&](int j, const float** srow) {
        for (int r = 0; r < kRows; ++r) {
          const int ek = __shfl_sync(kFullMask, e, slot(j, r));
          srow[r] = scale_row(p.w2_scale, ek, first + j / pairs, H);
        }
      },
      scale_shift(p.w2_scale, p.inter));
  // Tokens with no local slot: zeros.
  if (pairs == 0 && lane == 0) {
    for (int c = 0; c < cols; ++c) static_cast<T*>(p.out)[t * H + first + c] = from_float<T>(0.0f);
  }
}

size_t up_smem(const DecodeParams& p) { return size_t(p.hidden) * sizeof(float); }
// The staged activations: T, or floats with FP8.
size_t down_smem(const DecodeParams& p, int64_t bytes) {
  return size_t(p.topk * p.inter * (p.fp8 ? 4 : bytes));
}

// Launches `kernel` with `smem` bytes of dynamic shared memory, opting in
// past the default 48 KiB.
template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const DecodeParams& p, int per_warp,
            bool overlap_prior, cudaStream_t stream, const char* name) {
  if (smem > kDefaultSmem) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)), name);
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = overlap_prior ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, p, per_warp), name);
}

// Jobs per warp so that the grid is about one wave of resident blocks: every
// block then pays its prologue (ids, staging) once, and no second, partial
// wave runs at low occupancy.
int per_warp(int64_t warp_jobs) {
  // Two blocks an SM: __launch_bounds__(kThreads, 2).
  const int64_t resident_warps = int64_t(device_info().sm_count) * 2 * kWarps;
  return static_cast<int>(std::max<int64_t>(1, ceil_div(warp_jobs, resident_warps)));
}

int64_t element_bytes(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    default: return 0;
  }
}

// Bytes of a weight: the activations' type, or 1 for FP8.
int64_t weight_bytes(const DecodeParams& p) { return p.fp8 ? 1 : element_bytes(p.dtype); }

// FP8: bf16/fp16 activations quantized per row per group or statically (not
// per tensor: that scale would span every block), weight scales over
// power-of-two runs of at least a pack (16) or whole rows.
bool fp8_fits(const DecodeParams& p) {
  return p.dtype != ScalarType::Float && (p.act_group > 0 || (p.a13_static && p.a2_static)) &&
         scale_shift(p.w13_scale, p.hidden) >= 0 && scale_shift(p.w2_scale, p.inter) >= 0 &&
         shift_of(p.w13_scale.rows_per, p.gated ? 2 * p.inter : p.inter, 1) >= 0 &&
         shift_of(p.w2_scale.rows_per, p.hidden, 1) >= 0;
}

// Whether the kernels can take these shapes at all: 16-byte rows and strides,
// K <= 32, the staged vectors within shared memory.
bool decode_fits(const DecodeParams& p) {
  const int64_t bytes = element_bytes(p.dtype), wbytes = weight_bytes(p);
  if (bytes == 0 || (p.fp8 && !fp8_fits(p)) || (p.x_stride * bytes) % 16 != 0) return false;
  for (int64_t stride : {p.w13_expert_stride, p.w13_row_stride, p.w2_expert_stride, p.w2_row_stride})
    if ((stride * wbytes) % 16 != 0) return false;
  const size_t max_smem = device_info().max_smem_optin;
  return p.num_tokens > 0 && p.topk > 0 && p.topk <= 32 &&
         p.num_tokens * p.topk <= 65535 &&  // grid.y of up_kernel
         p.hidden > 0 && (p.hidden * wbytes) % 16 == 0 && (p.hidden * bytes) % 16 == 0 &&
         up_smem(p) <= max_smem && p.inter > 0 && (p.inter * wbytes) % 16 == 0 &&
         (p.inter * bytes) % 16 == 0 && down_smem(p, bytes) <= max_smem && aligned16(p.x) &&
         aligned16(p.w13) && aligned16(p.w2);
}

// Activations T, weights W (T, or uint8_t for e4m3).
template <typename T, typename W>
void launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const char* name = "fused_experts (decode)";
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    const int64_t slots = p.num_tokens * p.topk, cols = ceil_div(p.inter, p.gated ? 1 : kRows);
    const int jobs = per_warp(slots * cols);
    const dim3 grid(grid_size(ceil_div(cols, kWarps * jobs), name), static_cast<unsigned>(slots));
    launch(p.gated ? up_kernel<T, W, A, true> : up_kernel<T, W, A, false>, grid, up_smem(p), p,
           jobs, false, stream, "fused_experts (decode): up_kernel");
  });
  const int cols = per_warp(p.num_tokens * p.hidden);
  const dim3 grid(grid_size(ceil_div(p.hidden, kWarps * cols), name),
                  static_cast<unsigned>(p.num_tokens));
  // Programmatic dependent launch exists from sm_90 on.
  const bool overlap = device_info().major >= 9;
  launch(down_kernel<T, W>, grid, down_smem(p, sizeof(T)), p, cols, overlap, stream,
         "fused_experts (decode): down_kernel");
}

}  // namespace

bool decode_applies(const DecodeParams& p) {
  const char* forced = std::getenv("FUSED_MOE_DECODE");
  if (forced && std::strcmp(forced, "0") == 0) return false;
  if (!decode_fits(p)) return false;
  if (forced && std::strcmp(forced, "1") == 0) return true;
  // FP8 weights: not yet faster than the chain's FP8 GEMMs (benchmarks/RESULTS.md,
  // "FP8 experts"), so taken only when forced.
  if (p.fp8) return false;
  // One token reads each chosen expert once: always. With more, this path
  // reads an expert once per slot on it (the chain once) at a lower share of
  // HBM bandwidth than the chain's GEMMs, which wins only while the chain's
  // fixed launch cost is a large part of the total: up to kMaxSlotBytes of
  // slot weights (benchmarks/RESULTS.md, "Decode path").
  const int64_t n13 = p.gated ? 2 * p.inter : p.inter;
  const double slot_bytes = double(p.num_tokens) * p.topk * (n13 + p.inter) * p.hidden *
                            weight_bytes(p);
  return p.num_tokens == 1 || slot_bytes <= kMaxSlotBytes;
}

void decode(const DecodeParams& p, cudaStream_t stream) {
  // The caller decided by decode_applies; only what the kernels need is checked again.
  if (!decode_fits(p) || !aligned16(p.act))
    fail("fused_experts (decode): the shapes or the alignment do not allow this path");
  dispatch_float(p.dtype, "fused_experts (decode)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      launch_typed<T, T>(p, stream);
    } else if (p.fp8) {
      launch_typed<T, uint8_t>(p, stream);
    } else {
      launch_typed<T, T>(p, stream);
    }
  });
}

}  // namespace fused_moe::cuda
