// The decode path (decode.cu) for e4m3 weights: the same two kernels, with
// the products on the tensor cores, e4m3 times e4m3 (mma.sync m16n8k32,
// sm_89 on), as the chain's FP8 GEMMs compute them. x and the activations
// are quantized into shared memory as quantize_fp8 quantizes them (fp8.cuh),
// and each run of k that one weight scale and one activation scale cover is
// summed alone, then scaled by both. (Widening e4m3 weights in registers for
// float FMAs costs more instructions per weight byte than the bf16 kernels
// spend per two bytes: no faster than bf16; benchmarks/RESULTS.md, "FP8
// experts".)
//
// A warp's dot product is 16 weight rows times one staged vector, in chunks
// of 64 columns: lane (g, q) = (lane / 4, lane % 4) loads the 16 bytes at
// column 64c + 16q of rows g and g + 8. The order of k inside an MMA does not
// change its sum as long as both operands follow it, so those 16 bytes are
// the lane's A fragments of two MMAs (words 0-1 and 2-3 of each row), and the
// vector's 16 bytes at the same columns its B fragments (token column g: only
// column 0 is used, the other seven read the same vector). Lanes with q = 0
// end with the sums of rows g (c0) and g + 8 (c2).
#include <algorithm>
#include <type_traits>

#include "activation_math.h"
#include "cuda/common.cuh"
#include "cuda/decode.cuh"
#include "cuda/fp8.cuh"

namespace fused_moe::cuda::decode_detail {
namespace {

constexpr int kChunk = 64;       // columns of one lane load per row
constexpr int kStageChunks = 4;  // a stage: 128 bytes a lane; two in flight

// d += a b for the lane's fragments of a 16x32 e4m3 A and 32x8 e4m3 B.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // fp8_fits keeps older GPUs off this path
#endif
}

// One dot product of 16 weight rows with a staged vector, as this lane sees
// it: its two rows (g, g + 8), their weight scales (one per w_cols columns)
// and the vector with its scales (one per a_cols columns).
struct Dot {
  const uint8_t* row[2];
  const float* w_scale[2];
  const uint8_t* x;
  const float* x_scale;
};

// Where the scales change, in chunks: a scale of the weights covers
// 2^w_shift chunks, one of the staged vectors 2^a_shift (31: the whole row),
// and both stay the same over runs of run_mask + 1. Shifts and masks, because
// a division per chunk costs more instructions than the chunk's MMAs.
struct Runs {
  int w_shift, a_shift, run_mask;
};

// A stage keeps what its multiplies need: the weights, their scales where a
// run ends, and the vector.
struct Stage {
  uint4 w[kStageChunks][2];
  float w_scale[kStageChunks][2];
  const uint8_t* x;
  const float* x_scale;
};

// The warp's share of `dots` dot products: chunks [begin, end) of each,
// streamed in stages of kStageChunks with the next stage's loads in flight,
// across dot boundaries too.
//   dot_of(i, dot): fills the Dot of dot product i
//   stage():        stages the vectors; called once by every warp (it may
//                   sync the block) after the first weight loads are issued
// The warp's partial sums of dot product i go to partial[i][warp][16]
// (zeros for an empty share), for the block to add them up (sum_of_warps)
// after a __syncthreads.
template <typename DotOf, typename Staging>
__device__ __forceinline__ void stream_mma(int dots, int begin, int end, Runs runs, DotOf dot_of,
                                           Staging stage, float* partial) {
  const int lane = threadIdx.x % 32, q = lane % 4, warp = threadIdx.x / 32;
  // Lanes with q = 0 hold the sums of rows g (c0) and g + 8 (c2).
  auto done = [&](int i, float s0, float s1) {
    if (q != 0) return;
    float* mine = partial + (i * kWarps + warp) * 16;
    mine[lane / 4] = s0, mine[lane / 4 + 8] = s1;
  };
  const int per_dot = (end - begin + kStageChunks - 1) / kStageChunks, steps = dots * per_dot;
  // Scales are applied where a run ends, and at the end of the share.
  auto run_ends = [&](int c) { return ((c + 1) & runs.run_mask) == 0 || c + 1 == end; };
  auto load = [&](Stage& s, int step) {
    const int i = step / per_dot, c0 = begin + (step - i * per_dot) * kStageChunks;
    Dot dot;
    dot_of(i, dot);
    s.x = dot.x, s.x_scale = dot.x_scale;
#pragma unroll
    for (int u = 0; u < kStageChunks; ++u) {
      const int c = c0 + u;
      if (c >= end) break;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        s.w[u][r] = load_streaming(dot.row[r] + c * kChunk + 16 * q);
        if (run_ends(c)) s.w_scale[u][r] = dot.w_scale[r][c >> runs.w_shift];
      }
    }
  };
  float d[4] = {}, sum[2] = {};
  auto consume = [&](const Stage& s, int step) {
    const int i = step / per_dot, c0 = begin + (step - i * per_dot) * kStageChunks;
#pragma unroll
    for (int u = 0; u < kStageChunks; ++u) {
      const int c = c0 + u;
      if (c >= end) break;
      const uint4 x = *reinterpret_cast<const uint4*>(s.x + c * kChunk + 16 * q);
      const uint4 &w0 = s.w[u][0], &w1 = s.w[u][1];
      mma_e4m3(d, w0.x, w1.x, w0.y, w1.y, x.x, x.y);
      mma_e4m3(d, w0.z, w1.z, w0.w, w1.w, x.z, x.w);
      if (run_ends(c)) {
        const float xs = s.x_scale[c >> runs.a_shift];
        sum[0] = fmaf(d[0], s.w_scale[u][0] * xs, sum[0]);
        sum[1] = fmaf(d[2], s.w_scale[u][1] * xs, sum[1]);
#pragma unroll
        for (int v = 0; v < 4; ++v) d[v] = 0.0f;
      }
    }
    if (c0 + kStageChunks < end) return;
    done(i, sum[0], sum[1]);
    sum[0] = sum[1] = 0.0f;
  };
  Stage a, b;
  if (steps > 0) load(a, 0);
  stage();
  if (steps == 0) {
    for (int i = 0; i < dots; ++i) done(i, 0.0f, 0.0f);
    return;
  }
  two_stages(steps, a, b, load, consume);
}

// Row r (< 16) of dot product i, added over the block's warps in warp order.
__device__ __forceinline__ float sum_of_warps(const float* partial, int i, int r) {
  float sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) sum += partial[(i * kWarps + w) * 16 + r];
  return sum;
}

// Warp w's share of `chunks` chunks: a contiguous eighth.
__device__ __forceinline__ int share_begin(int chunks, int w) { return chunks * w / kWarps; }

// Rows [0, rows) of src (`n` columns, rows `ld` apart; element j of row r
// read as value(r, v)) quantized by the block into e4m3 rows of q (n apart)
// with one scale per `group` columns in scales (rows ceil(n / group) apart),
// as quantize_fp8 does, or by the static scale `fixed`. A warp per (row,
// group); rows with keep(r) false are left alone.
template <typename T, typename Keep, typename Value>
__device__ void stage_quantized(const T* src, int64_t ld, int rows, int n, int group,
                                const float* fixed, uint8_t* q, float* scales, Keep keep,
                                Value value) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_row = (n + group - 1) / group;
  for (int g = warp; g < rows * per_row; g += kWarps) {
    const int r = g / per_row, c0 = (g - r * per_row) * group, m = min(group, n - c0);
    if (!keep(r)) continue;
    const T* x = src + r * ld + c0;
    float scale;
    if (fixed) {
      scale = *fixed;
    } else {
      float amax = 0.0f;
      for (int i = lane; i < m; i += 32) amax = fmaxf(amax, fabsf(value(r, x[i])));
#pragma unroll
      for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
      scale = fp8_scale_of(amax);
    }
    if (lane == 0) scales[g] = scale;
    for (int i = lane; i < m; i += 32) q[r * n + c0 + i] = fp8_quantize(value(r, x[i]), scale);
  }
}

// The scales of expert e's weight row `row`: one per s.cols_per columns.
__device__ __forceinline__ const float* scale_row(const ScaleGrid& s, int e, int row) {
  return s.data + e * s.expert_stride + (row / int(s.rows_per)) * s.row_stride;
}

// Columns per activation scale in rows of n: act_group, or the whole row
// (per row, or a static scale).
__host__ __device__ inline int act_cols(const DecodeParams& p, int64_t n) {
  return int(p.act_group > 0 && p.act_group < n ? p.act_group : n);
}

// log2 of the chunks one scale covers in rows of n columns: 31 for the
// whole row, -1 unless a power of two of whole chunks.
__host__ __device__ inline int chunk_shift(int64_t per, int64_t n) {
  if (per >= n) return 31;
  int shift = 0;
  while (shift < 30 && (int64_t(kChunk) << shift) < per) ++shift;
  return (int64_t(kChunk) << shift) == per ? shift : -1;
}

__host__ __device__ inline Runs runs_of(const ScaleGrid& w, int a_cols, int64_t n) {
  const int ws = chunk_shift(w.cols_per, n), as = chunk_shift(a_cols, n);
  const int run = ws < as ? ws : as;
  return {ws, as, run >= 31 ? 0x7fffffff : (1 << run) - 1};
}

bool runs_fit(const Runs& r) { return r.w_shift >= 0 && r.a_shift >= 0; }

size_t staged_bytes(int64_t rows, int64_t n, int group) {
  return size_t(rows) * (n + 4 * ceil_div(n, group));
}

// Block (x, s): `jobs` dot products of 16 w13 rows with x[t] (times the
// router weight, rounded to T, as the chain's gathered row), staged
// quantized; each gives C columns of act[s]: 8 gated (their gate rows, then
// their up rows), 16 plain. The block's warps split K, and their partial
// sums meet in shared memory, added in warp order.
template <typename T, Activation A, bool Gated>
__global__ void __launch_bounds__(kThreads, 2) fp8_up_kernel(DecodeParams p, int jobs_per_block) {
  constexpr int C = Gated ? 8 : 16;
  extern __shared__ float4 smem[];
  allow_dependent_launch();
  const int slot = blockIdx.y, H = int(p.hidden), I = int(p.inter);
  const int e = local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local_experts);
  if (e < 0) return;  // whole block: a slot of another rank is never read
  const int group = act_cols(p, H);
  float* partial = reinterpret_cast<float*>(smem);  // [jobs][kWarps][16]
  uint8_t* xq = reinterpret_cast<uint8_t*>(partial + jobs_per_block * kWarps * 16);
  float* xs = reinterpret_cast<float*>(xq + H);  // H is a multiple of 64
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const int first = blockIdx.x * jobs_per_block * C;
  const int jobs = max(0, min(jobs_per_block, (I - first + C - 1) / C));
  // The w13 row of row r (0..15) of job i, clamped inside w13.
  auto row_of = [&](int i, int r) {
    const int base = first + i * C;
    if constexpr (!Gated) return min(base + r, I - 1);
    const int col = min(base + r % 8, I - 1);
    if constexpr (A == Activation::kSwigluOai) return 2 * col + r / 8;  // interleaved
    return (r / 8) * I + col;
  };
  const int n13 = Gated ? 2 * I : I;
  const uint8_t* w13 = static_cast<const uint8_t*>(p.w13) + int64_t(e) * p.w13_expert_stride;
  const Runs runs = runs_of(p.w13_scale, group, H);
  const int chunks = H / kChunk;
  stream_mma(
      jobs, share_begin(chunks, warp), share_begin(chunks, warp + 1), runs,
      [&](int i, Dot& d) {
        for (int r = 0; r < 2; ++r) {
          const int row = row_of(i, g + 8 * r);
          d.row[r] = w13 + row * p.w13_row_stride;
          d.w_scale[r] = scale_row(p.w13_scale, e, row);
        }
        d.x = xq, d.x_scale = xs;
      },
      [&] {
        const float weight = p.weight_on_input ? p.topk_weights[slot] : 1.0f;
        stage_quantized(static_cast<const T*>(p.x) + slot / p.topk * p.x_stride, 0, 1, H, group,
                        p.a13_static, xq, xs, [](int) { return true; },
                        [&](int, T v) { return to_float(from_float<T>(to_float(v) * weight)); });
        __syncthreads();
      },
      partial);
  __syncthreads();
  // Warp i finishes job i: lane r < 16 sums row r over the warps.
  const int i = warp;
  if (i >= jobs) return;
  const float sum = lane < 16 ? sum_of_warps(partial, i, lane) : 0.0f;
  const void* bias = p.w13_bias;
  const int64_t b = int64_t(e) * n13;
  const float y = rounded<T>(sum, bias, b + row_of(i, lane % 16));
  T* out = static_cast<T*>(p.act) + int64_t(slot) * I + first + i * C;
  if constexpr (Gated) {
    const float up = __shfl_down_sync(kFullMask, y, 8);
    if (lane < 8 && first + i * C + lane < I) out[lane] = from_float<T>(gated_act<A>(y, up));
  } else {
    if (lane < 16 && first + i * C + lane < I) out[lane] = from_float<T>(act<A>(y));
  }
}

// Block (x, t): `jobs` groups of 16 columns of out[t]; per group, one dot
// product per local slot of the token (its activations staged quantized),
// the block's warps splitting I as in fp8_up_kernel. Then each column is
// the weighted sum over the slots in slot order, separate multiply and add,
// as unpermute adds.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fp8_down_kernel(DecodeParams p, int jobs_per_block) {
  extern __shared__ float4 smem[];
  const int t = blockIdx.y, H = int(p.hidden), I = int(p.inter), K = p.topk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const int group = act_cols(p, I), groups = (I + group - 1) / group;
  const TokenSlots ts = token_slots(p, t, lane);
  const int e = ts.e, slots = ts.slots, ranked = ts.ranked;
  const float weight = ts.weight;
  const unsigned local = ts.local;
  const int first = blockIdx.x * jobs_per_block * 16;
  const int jobs = max(0, min(jobs_per_block, (H - first + 15) / 16));
  float* partial = reinterpret_cast<float*>(smem);  // [jobs * K][kWarps][16]
  uint8_t* aq = reinterpret_cast<uint8_t*>(partial + jobs_per_block * K * kWarps * 16);
  float* as = reinterpret_cast<float*>(aq + K * I);  // I is a multiple of 64
  const uint8_t* w2 = static_cast<const uint8_t*>(p.w2);
  const Runs runs = runs_of(p.w2_scale, group, I);
  const int chunks = I / kChunk;
  auto slot_of = [&](int d) { return __shfl_sync(kFullMask, ranked, d % max(slots, 1)); };
  stream_mma(
      jobs * slots, share_begin(chunks, warp), share_begin(chunks, warp + 1), runs,
      [&](int d, Dot& dot) {
        const int k = slot_of(d), ek = __shfl_sync(kFullMask, e, k);
        for (int r = 0; r < 2; ++r) {
          const int row = min(first + (d / slots) * 16 + g + 8 * r, H - 1);
          dot.row[r] = w2 + int64_t(ek) * p.w2_expert_stride + row * p.w2_row_stride;
          dot.w_scale[r] = scale_row(p.w2_scale, ek, row);
        }
        dot.x = aq + k * I, dot.x_scale = as + k * groups;
      },
      [&] {
        wait_for_prior_kernel();  // act is fp8_up_kernel's output
        stage_quantized(static_cast<const T*>(p.act) + int64_t(t) * K * I, I, K, I, group,
                        p.a2_static, aq, as, [&](int k) { return (local >> k) & 1; },
                        [](int, T v) { return to_float(v); });
        __syncthreads();
      },
      partial);
  __syncthreads();
  // Warp j finishes column group j: lane c < 16 column first + 16 j + c.
  for (int j = warp; j < jobs; j += kWarps) {
    const int col = min(first + 16 * j + lane % 16, H - 1);
    float out = 0.0f;
    for (int i = 0; i < slots; ++i) {
      const int k = __shfl_sync(kFullMask, ranked, i), ek = __shfl_sync(kFullMask, e, k);
      const float w = __shfl_sync(kFullMask, weight, k);
      const float sum = sum_of_warps(partial, j * slots + i, lane % 16);
      out = __fadd_rn(out, __fmul_rn(w, rounded<T>(sum, p.w2_bias, int64_t(ek) * H + col)));
    }
    if (lane < 16 && first + 16 * j + lane < H)
      static_cast<T*>(p.out)[int64_t(t) * H + first + 16 * j + lane] = from_float<T>(out);
  }
}

// Jobs a block: about one wave of resident blocks, at most kMaxJobs (the
// partial sums' shared memory).
constexpr int kMaxJobs = 4;
int jobs_per_block(int64_t jobs) {
  const int64_t resident = int64_t(device_info().sm_count) * 2;
  return static_cast<int>(std::min<int64_t>(kMaxJobs, std::max<int64_t>(1, jobs / resident)));
}

size_t partial_bytes(int jobs) { return size_t(jobs) * kWarps * 16 * sizeof(float); }
size_t up_smem(const DecodeParams& p, int jobs) {
  return partial_bytes(jobs) + staged_bytes(1, p.hidden, act_cols(p, p.hidden));
}
size_t down_smem(const DecodeParams& p, int jobs) {
  return partial_bytes(jobs * p.topk) + staged_bytes(p.topk, p.inter, act_cols(p, p.inter));
}

template <typename T>
void launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const char* name = "fused_experts (FP8 decode)";
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    const int64_t slots = p.num_tokens * p.topk, jobs = ceil_div(p.inter, p.gated ? 8 : 16);
    const int per = jobs_per_block(slots * jobs);
    const dim3 grid(grid_size(ceil_div(jobs, per), name), static_cast<unsigned>(slots));
    launch(p.gated ? fp8_up_kernel<T, A, true> : fp8_up_kernel<T, A, false>, grid,
           up_smem(p, per), p, per, false, stream, "fused_experts (FP8 decode): up_kernel");
  });
  const int64_t jobs = ceil_div(p.hidden, 16);
  const int per = jobs_per_block(p.num_tokens * jobs);
  const dim3 grid(grid_size(ceil_div(jobs, per), name), static_cast<unsigned>(p.num_tokens));
  launch(fp8_down_kernel<T>, grid, down_smem(p, per), p, per, can_overlap(), stream,
         "fused_experts (FP8 decode): down_kernel");
}

}  // namespace

// bf16/fp16 activations quantized per row per group (of whole chunks) or
// statically (not per tensor: that scale would span every block), weight
// scales over whole chunks or rows, every row and stride whole chunks of
// 16 bytes; mma.sync on e4m3 needs sm_89.
bool fp8_fits(const DecodeParams& p) {
  const DeviceInfo& d = device_info();
  const bool has_mma = d.major * 10 + d.minor >= 89;
  const bool acts = p.act_group > 0 || (p.a13_static && p.a2_static);
  const int64_t n13 = p.gated ? 2 * p.inter : p.inter;
  const size_t max_smem = d.max_smem_optin;
  bool ok = has_mma && p.dtype != ScalarType::Float && acts && p.num_tokens > 0 && p.topk > 0 &&
            p.topk <= 32 && p.num_tokens * p.topk <= 65535 && p.hidden % kChunk == 0 &&
            p.inter % kChunk == 0 && p.hidden > 0 && p.inter > 0 &&
            p.hidden <= INT32_MAX / 64 && n13 * p.hidden <= INT32_MAX &&
            up_smem(p, kMaxJobs) <= max_smem && down_smem(p, kMaxJobs) <= max_smem &&
            (p.x_stride * int64_t(p.dtype == ScalarType::Float ? 4 : 2)) % 16 == 0 &&
            aligned16(p.x) && aligned16(p.w13) && aligned16(p.w2);
  if (!ok) return false;
  ok = runs_fit(runs_of(p.w13_scale, act_cols(p, p.hidden), p.hidden)) &&
       runs_fit(runs_of(p.w2_scale, act_cols(p, p.inter), p.inter));
  for (int64_t stride : {p.w13_expert_stride, p.w13_row_stride, p.w2_expert_stride, p.w2_row_stride})
    ok = ok && stride % 16 == 0;
  return ok;
}

void launch_fp8(const DecodeParams& p, cudaStream_t stream) {
  dispatch_float(p.dtype, "fused_experts (FP8 decode)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) launch_typed<T>(p, stream);
  });
}

}  // namespace fused_moe::cuda::decode_detail
