// fused_experts for a few tokens (decode): two kernels that read each slot's
// expert weights straight from topk_ids, in place of the permute -> GEMM ->
// activation -> GEMM -> unpermute chain.
//
// With about one token per expert both GEMMs are matrix-vector products bound
// by the weight read; the chain's seven launches (two of them setup kernels)
// then cost as much as streaming the weights does. Here:
//   up_kernel:   act[s][i] = act(w13[e_s] x_t + b13[e_s])[i]     s = t*K + k
//   down_kernel: out[t] = sum over k = 0..K-1 of w[t,k] * (w2[e_k] act[t*K+k] + b2[e_k])
// Every warp owns a few output columns and keeps kUnroll 16-byte weight packs
// per row in flight. Two slots on the same expert read its weights twice, so
// fused_experts takes this path only when that is rare (decode_applies).
//
// Rounding follows the chain: GEMM outputs are rounded to T before the
// activation and before the weighted sum, which adds in slot order with
// separate multiply and add, as unpermute does.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "activation_math.h"
#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Packs per weight row per lane loaded before any is used: with 4 rows a warp
// that is 16 packs (256 bytes) a lane in flight.
constexpr int kUnroll = 4;
constexpr int kRows = 4;          // weight rows a warp streams at once
constexpr int kDownCols = 2;      // down_kernel: out columns a warp owns, for 2 slots at once
static_assert(kRows == 2 * kDownCols, "down_kernel streams two slots' rows at once");

// Weights are read once: keep them out of L1, which holds the vectors every
// warp of a block re-reads.
template <typename T>
__device__ __forceinline__ Pack<T, kVec<T>> load_streaming(const T* p) {
  uint4 raw;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(p));
  Pack<T, kVec<T>> r;
  memcpy(&r, &raw, sizeof(r));
  return r;
}

// Element q of a pack as a float. bf16 widens by a shift or a mask of its
// 32-bit word, so a pack stays in 4 registers rather than being split into
// 16-bit halves first (which costs ~60 registers in down_kernel).
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

// The dot products of R weight rows with vectors, summed over the warp: row j
// uses vec[j / (R / V)], each element scaled by `scale` and rounded to T first
// (the chain's gathered row; exact when scale is 1). Rows and vectors are
// `packs` 16-byte packs long.
template <typename T, int R, int V>
__device__ __forceinline__ void dot_rows(const T* const* row, const T* const* vec, float scale,
                                         int packs, int lane, float* acc) {
  constexpr int P = kVec<T>, kPerVec = R / V;
  for (int p0 = lane; p0 < packs; p0 += 32 * kUnroll) {
    Pack<T, P> w[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + 32 * u < packs) {
#pragma unroll
        for (int j = 0; j < R; ++j) w[u][j] = load_streaming(row[j] + (p0 + 32 * u) * P);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + 32 * u >= packs) break;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const Pack<T, P> x = load_pack<T, P>(vec[v] + (p0 + 32 * u) * P);
#pragma unroll
        for (int q = 0; q < P; ++q) {
          const float xf = to_float(from_float<T>(element(x, q) * scale));
#pragma unroll
          for (int j = v * kPerVec; j < (v + 1) * kPerVec; ++j)
            acc[j] = fmaf(element(w[u][j], q), xf, acc[j]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(kFullMask, acc[j], o);
  }
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

// Block (x, s): columns [x * kWarps * C, +kWarps * C) of act[s], C columns a
// warp (2 gated: a gate and an up row each; 4 plain).
template <typename T, Activation A, bool Gated>
__global__ void __launch_bounds__(kThreads, 2) up_kernel(DecodeParams p) {
  constexpr int C = Gated ? kRows / 2 : kRows;
  const int64_t slot = blockIdx.y, H = p.hidden, I = p.inter;
  const int e = local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local_experts);
  if (e < 0) return;  // whole block: a slot of another rank is never read
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = (int64_t(blockIdx.x) * kWarps + warp) * C;
  if (col >= I) return;

  // w13 row of output column c's gate (g = 0) or up (g = 1) half.
  const int64_t n13 = Gated ? 2 * I : I;
  auto row_of = [&](int c, int g) -> int64_t {
    const int64_t i = min(col + c, I - 1);  // columns past I re-read the last one
    if constexpr (!Gated) return i;
    else if constexpr (A == Activation::kSwigluOai) return 2 * i + g;  // interleaved
    else return g * I + i;
  };
  const T* w13 = static_cast<const T*>(p.w13) + int64_t(e) * n13 * H;
  const T* row[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) row[j] = w13 + row_of(j % C, j / C) * H;
  const T* x[1] = {static_cast<const T*>(p.x) + slot / p.topk * H};
  const float scale = p.weight_on_input ? p.topk_weights[slot] : 1.0f;
  float acc[kRows] = {};
  dot_rows<T, kRows, 1>(row, x, scale, static_cast<int>(H / kVec<T>), lane, acc);

  if (lane != 0) return;
  const void* bias = p.w13_bias;
  const int64_t b = int64_t(e) * n13;
  T* out = static_cast<T*>(p.act) + slot * I + col;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (col + c >= I) break;
    float y;
    if constexpr (Gated) {
      y = gated_act<A>(rounded<T>(acc[c], bias, b + row_of(c, 0)),
                       rounded<T>(acc[C + c], bias, b + row_of(c, 1)));
    } else {
      y = act<A>(rounded<T>(acc[c], bias, b + row_of(c, 0)));
    }
    out[c] = from_float<T>(y);
  }
}

// Block (x, t): out columns [x * kWarps * kDownCols, +kWarps * kDownCols) of
// token t. Lane k of each 32-slot chunk holds slot k's expert and weight; the
// warp walks the local slots in order, two at a time (kRows rows).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) down_kernel(DecodeParams p) {
  constexpr int C = kDownCols;
  const int64_t t = blockIdx.y, H = p.hidden, I = p.inter;
  const int K = p.topk, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = (int64_t(blockIdx.x) * kWarps + warp) * C;
  if (col >= H) return;
  const T* w2 = static_cast<const T*>(p.w2);
  const T* act = static_cast<const T*>(p.act) + t * K * I;
  const int packs = static_cast<int>(I / kVec<T>);
  auto row_of = [&](int e, int c) { return w2 + (int64_t(e) * H + min(col + c, H - 1)) * I; };

  float sum[C] = {};
  // Slot k's contribution: w * (the rounded GEMM output), added in slot order.
  auto add = [&](int e, float weight, const float* dot) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float y = rounded<T>(dot[c], p.w2_bias, int64_t(e) * H + min(col + c, H - 1));
      sum[c] = __fadd_rn(sum[c], __fmul_rn(weight, y));
    }
  };
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    int e = -1;
    float weight = 1.0f;
    if (k < K) {
      e = local_expert(p.topk_ids[t * K + k], p.expert_map, p.num_experts, p.num_local_experts);
      if (!p.weight_on_input) weight = p.topk_weights[t * K + k];
    }
    unsigned local = __ballot_sync(kFullMask, e >= 0);
    while (local) {
      const int a = __ffs(local) - 1;
      local &= local - 1;
      // A lone last slot (b == a) reads its rows twice, from L2 the second time.
      const int b = local ? __ffs(local) - 1 : a;
      if (local) local &= local - 1;
      const int ea = __shfl_sync(kFullMask, e, a), eb = __shfl_sync(kFullMask, e, b);
      const float wa = __shfl_sync(kFullMask, weight, a), wb = __shfl_sync(kFullMask, weight, b);
      const T* row[kRows] = {row_of(ea, 0), row_of(ea, 1), row_of(eb, 0), row_of(eb, 1)};
      const T* vec[2] = {act + (k0 + a) * I, act + (k0 + b) * I};
      float dot[kRows] = {};
      dot_rows<T, kRows, 2>(row, vec, 1.0f, packs, lane, dot);
      add(ea, wa, dot);
      if (b != a) add(eb, wb, dot + C);
    }
  }
  if (lane != 0) return;
  T* out = static_cast<T*>(p.out) + t * H + col;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (col + c < H) out[c] = from_float<T>(sum[c]);
  }
}

int64_t element_bytes(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    default: return 0;
  }
}

}  // namespace

bool decode_applies(const DecodeParams& p) {
  const char* forced = std::getenv("FUSED_MOE_DECODE");
  if (forced && std::strcmp(forced, "0") == 0) return false;
  const int64_t bytes = element_bytes(p.dtype);
  const bool shapes = bytes > 0 && p.num_tokens > 0 && p.topk > 0 &&
                      p.num_tokens * p.topk <= 65535 &&  // grid.y of up_kernel
                      p.hidden > 0 && p.hidden <= INT32_MAX && (p.hidden * bytes) % 16 == 0 &&
                      p.inter > 0 && p.inter <= INT32_MAX && (p.inter * bytes) % 16 == 0 &&
                      aligned16(p.x) && aligned16(p.w13) && aligned16(p.w2);
  if (!shapes) return false;
  if (forced && std::strcmp(forced, "1") == 0) return true;
  // One token reads each chosen expert once; beyond that, duplicates (about
  // M*K / 2E of the reads) must stay below what the chain's launches cost.
  return p.num_tokens == 1 || 4 * p.num_tokens * p.topk <= p.num_experts;
}

void decode(const DecodeParams& p, cudaStream_t stream) {
  if (!decode_applies(p) || !aligned16(p.act))
    fail("fused_experts (decode): the shapes or the alignment do not allow this path");
  dispatch_float(p.dtype, "fused_experts (decode)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_activation(p.activation, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const int cols = kWarps * (p.gated ? kRows / 2 : kRows);
      const dim3 grid(grid_size(ceil_div(p.inter, cols), "fused_experts (decode)"),
                      static_cast<unsigned>(p.num_tokens * p.topk));
      auto kernel = p.gated ? up_kernel<T, A, true> : up_kernel<T, A, false>;
      kernel<<<grid, kThreads, 0, stream>>>(p);
      check_launch("fused_experts (decode): up_kernel");
    });
    const dim3 grid(grid_size(ceil_div(p.hidden, kWarps * kDownCols), "fused_experts (decode)"),
                    static_cast<unsigned>(p.num_tokens));
    down_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    check_launch("fused_experts (decode): down_kernel");
  });
}

}  // namespace fused_moe::cuda
