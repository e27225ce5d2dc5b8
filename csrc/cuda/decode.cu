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
// FP8 weights take the kernels of decode_fp8.cu, on the tensor cores.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "activation_math.h"
#include "cuda/common.cuh"
#include "cuda/decode.cuh"

namespace fused_moe::cuda {
namespace {

using namespace decode_detail;

constexpr int kRows = 2;    // weight rows a warp streams together
// Packs per row per lane in one stage; two stages are in flight (the next
// loads while the current multiplies): 16 packs, 256 bytes a lane.
constexpr int kUnroll = 4;
constexpr double kMaxSlotBytes = 400e6;  // see decode_applies

template <typename T>
__device__ __forceinline__ Pack<T, kVec<T>> load_weights(const T* p) {
  static_assert(sizeof(Pack<T, kVec<T>>) == 16);
  const uint4 raw = load_streaming(p);
  Pack<T, kVec<T>> r;
  memcpy(&r, &raw, sizeof(r));
  return r;
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


// One lane's share of a stage: kUnroll packs of each of the kRows rows.
template <typename T>
struct Stage {
  Pack<T, kVec<T>> w[kUnroll][kRows];
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
// Weight rows are `packs` 16-byte packs long; vectors as many elements.
template <typename T, typename Rows, typename Staging, typename Vec, typename Done>
__device__ __forceinline__ void stream_dots(int jobs, int packs, int lane, Rows rows,
                                            Staging stage, Vec vec, Done done) {
  constexpr int P = kVec<T>, U = kUnroll, kStep = 32 * U;
  const int chunks = (packs + kStep - 1) / kStep, steps = jobs * chunks;
  auto load = [&](Stage<T>& s, int step) {
    const int j = step / chunks, p0 = lane + (step - j * chunks) * kStep;
    const T* row[kRows];
    rows(j, row);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (p0 + 32 * u < packs) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) s.w[u][r] = load_weights(row[r] + (p0 + 32 * u) * P);
      }
    }
  };
  float acc[kRows] = {};
  auto consume = [&](const Stage<T>& s, int step) {
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
        float x[P];
        vector_at<P>(v[r], col, x);
#pragma unroll
        for (int q = 0; q < P; ++q) acc[r] = fmaf(element(s.w[u][r], q), x[q], acc[r]);
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
  Stage<T> a, b;
  if (steps > 0) load(a, 0);
  stage();
  two_stages(steps, a, b, load, consume);
}

// Block (x, s): output columns [x * kWarps * J * C, +kWarps * J * C) of
// act[s]; a warp's J jobs are C columns each: 1 gated (its gate and up rows),
// 2 plain. x[t] (scaled by the router weight and rounded to T, as the chain's
// gathered row) is staged in shared memory as floats.
template <typename T, Activation A, bool Gated>
__global__ void __launch_bounds__(kThreads, 2) up_kernel(DecodeParams p, int jobs_per_warp) {
  constexpr int C = Gated ? 1 : kRows, P = kVec<T>;
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
  const T* w13 = static_cast<const T*>(p.w13) + int64_t(e) * p.w13_expert_stride;
  const void* bias = p.w13_bias;
  const int64_t b = int64_t(e) * n13;
  T* out = static_cast<T*>(p.act) + slot * I;
  stream_dots<T>(
      jobs, static_cast<int>(H / P), lane,
      [&](int j, const T** row) {
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
      });
}

// Block (x, t): out columns [x * kWarps * J, +kWarps * J) of token t, J
// consecutive ones a warp. The token's activations (its K rows of act, local
// slots only) are staged in shared memory. Lane k holds slot k's expert and
// weight; a column's jobs take the local slots two at a time in slot order,
// the order of the weighted sum.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) down_kernel(DecodeParams p, int cols_per_warp) {
  constexpr int P = kVec<T>;
  extern __shared__ float4 smem[];
  T* act = reinterpret_cast<T*>(smem);
  const int64_t t = blockIdx.y, H = p.hidden, I = p.inter;
  const int K = p.topk, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TokenSlots ts = token_slots(p, t, lane);
  const int e = ts.e, slots = ts.slots, ranked = ts.ranked, pairs = (slots + 1) / 2;
  const float weight = ts.weight;
  const unsigned local = ts.local;
  const int64_t first = (int64_t(blockIdx.x) * kWarps + warp) * cols_per_warp;
  const int cols = static_cast<int>(max(int64_t(0), min(int64_t(cols_per_warp), H - first)));
  // Job j is column first + j / pairs and the local slots 2i and 2i + 1 of
  // i = j % pairs (the same one twice for a lone last slot, whose row is then
  // streamed twice, from L2 the second time).
  auto slot = [&](int j, int r) {
    const int i = 2 * (j % pairs) + r;
    return __shfl_sync(kFullMask, ranked, i < slots ? i : i - 1);
  };
  const T* w2 = static_cast<const T*>(p.w2);
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
  stream_dots<T>(
      cols * pairs, static_cast<int>(I / P), lane,
      [&](int j, const T** row) {
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
              *reinterpret_cast<Pack<T, P>*>(act + int64_t(i) * P) = v;
            });
        __syncthreads();
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
      });
  // Tokens with no local slot: zeros.
  if (pairs == 0 && lane == 0) {
    for (int c = 0; c < cols; ++c) static_cast<T*>(p.out)[t * H + first + c] = from_float<T>(0.0f);
  }
}

size_t up_smem(const DecodeParams& p) { return size_t(p.hidden) * sizeof(float); }
size_t down_smem(const DecodeParams& p, int64_t bytes) { return size_t(p.topk * p.inter * bytes); }

int64_t element_bytes(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    default: return 0;
  }
}

// Whether the 16-bit/fp32 kernels can take these shapes at all: 16-byte rows
// and strides, K <= 32, the staged vectors within shared memory.
bool fits(const DecodeParams& p) {
  const int64_t bytes = element_bytes(p.dtype);
  if (bytes == 0 || (p.x_stride * bytes) % 16 != 0) return false;
  for (int64_t stride : {p.w13_expert_stride, p.w13_row_stride, p.w2_expert_stride, p.w2_row_stride})
    if ((stride * bytes) % 16 != 0) return false;
  const size_t max_smem = device_info().max_smem_optin;
  return p.num_tokens > 0 && p.topk > 0 && p.topk <= 32 &&
         p.num_tokens * p.topk <= 65535 &&  // grid.y of up_kernel
         p.hidden > 0 && (p.hidden * bytes) % 16 == 0 && up_smem(p) <= max_smem &&
         p.inter > 0 && (p.inter * bytes) % 16 == 0 && down_smem(p, bytes) <= max_smem &&
         aligned16(p.x) && aligned16(p.w13) && aligned16(p.w2);
}

bool decode_fits(const DecodeParams& p) { return p.fp8 ? fp8_fits(p) : fits(p); }

template <typename T>
void launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const char* name = "fused_experts (decode)";
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    const int64_t slots = p.num_tokens * p.topk, cols = ceil_div(p.inter, p.gated ? 1 : kRows);
    const int jobs = per_warp(slots * cols);
    const dim3 grid(grid_size(ceil_div(cols, kWarps * jobs), name), static_cast<unsigned>(slots));
    launch(p.gated ? up_kernel<T, A, true> : up_kernel<T, A, false>, grid, up_smem(p), p,
           jobs, false, stream, "fused_experts (decode): up_kernel");
  });
  const int cols = per_warp(p.num_tokens * p.hidden);
  const dim3 grid(grid_size(ceil_div(p.hidden, kWarps * cols), name),
                  static_cast<unsigned>(p.num_tokens));
  launch(down_kernel<T>, grid, down_smem(p, sizeof(T)), p, cols, can_overlap(), stream,
         "fused_experts (decode): down_kernel");
}

}  // namespace

bool decode_applies(const DecodeParams& p) {
  const char* forced = std::getenv("FUSED_MOE_DECODE");
  if (forced && std::strcmp(forced, "0") == 0) return false;
  if (!decode_fits(p)) return false;
  if (forced && std::strcmp(forced, "1") == 0) return true;
  // One token reads each chosen expert once: always. With more, this path
  // reads an expert once per slot on it (the chain once) at a lower share of
  // HBM bandwidth than the chain's GEMMs, which wins only while the chain's
  // fixed launch cost is a large part of the total: up to kMaxSlotBytes of
  // slot weights (benchmarks/RESULTS.md, "Decode path"). FP8: one token only
  // (benchmarks/RESULTS.md, "FP8 experts").
  if (p.fp8) return p.num_tokens == 1;
  const int64_t n13 = p.gated ? 2 * p.inter : p.inter;
  const double slot_bytes = double(p.num_tokens) * p.topk * (n13 + p.inter) * p.hidden *
                            element_bytes(p.dtype);
  return p.num_tokens == 1 || slot_bytes <= kMaxSlotBytes;
}

void decode(const DecodeParams& p, cudaStream_t stream) {
  // The caller decided by decode_applies; only what the kernels need is checked again.
  if (!decode_fits(p) || !aligned16(p.act))
    fail("fused_experts (decode): the shapes or the alignment do not allow this path");
  if (p.fp8) {
    launch_fp8(p, stream);
    return;
  }
  dispatch_float(p.dtype, "fused_experts (decode)", [&](auto tag) {
    launch_typed<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace fused_moe::cuda
