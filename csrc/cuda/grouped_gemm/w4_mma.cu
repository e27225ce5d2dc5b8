// The grouped GEMM for 4-bit weights (mxfp4, int4) and 16-bit activations on
// the tensor cores (mma.sync m16n8k16, sm_80 on), for the calls w4_mma_fits
// takes; grouped_gemm.cu sends the others to the fallback.
//
// A block is a tile of kTok rows of one expert (tiles.cuh) times a slice of
// the weight rows (out's columns). Each warp owns 16 weight rows, g and g + 8
// for lane (g, t) = (lane / 4, lane % 4), and streams their packed bytes from
// global memory straight into registers: per 64 columns, the 8 bytes (16
// codes) at column 16t of both rows. Decoded in registers (w4.cuh), those are
// the lane's A fragments of four MMAs: the order of k inside an MMA does not
// change its sum as long as both operands follow it, and the lane's B
// fragments are then the 16 activations at the same columns, two 16-byte
// reads of the block's rows of a, staged in shared memory by cp.async.
// Both are double-buffered: the next chunk's weights (registers) and rows
// (shared memory) load while this one multiplies. With kSplit > 1, warps
// split K and add their partial sums in shared memory in warp order: small
// tiles then still give every SM blocks enough to keep weights streaming.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm/tiles.cuh"
#include "cuda/w4.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnit = 64;  // columns a lane step: 4 MMAs of k16

// A tile: kTok rows of a; kSplit warps on each 16-row slice of w, splitting
// K; kSteps lane steps per warp per staged chunk (registers: two chunks of
// weights are in flight). Rows of a chunk are kLd apart: 16 bytes of pad, so
// the lanes' reads fall in distinct banks.
template <int kTok_, int kSplit_>
struct Tiling {
  static constexpr int kTok = kTok_, kSplit = kSplit_;
  static constexpr int kRowsN = 16 * kWarps / kSplit;
  static constexpr int kSteps = kTok >= 32 ? 2 : 4;
  static constexpr int kUnits = kSteps * kSplit;
  static constexpr int kCols = kUnit * kUnits;
  static constexpr int kLd = kCols + 8;
  static constexpr int kStage = kTok * kLd;  // T per buffer
};

// Weights are read once per tile: keep them out of L1.
__device__ __forceinline__ uint2 load_weights(const uint8_t* p) {
  uint2 raw;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
               : "=r"(raw.x), "=r"(raw.y)
               : "l"(p));
  return raw;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(at), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

// Rows [0, rows) of a (row stride ld), columns [k0, k0 + kCols) within K,
// into smem (kLd apart); the rest of the buffer's kTok rows zero.
template <typename T, typename Tl>
__device__ void stage(T* smem, const T* a, int64_t ld, int rows, int64_t k, int64_t k0) {
  constexpr int kPerRow = Tl::kCols / 8;
  for (int i = threadIdx.x; i < Tl::kTok * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i - r * kPerRow) * 8;
    const bool valid = r < rows && k0 + c < k;
    cp_async16(smem + r * Tl::kLd + c, valid ? a + r * ld + k0 + c : a, valid);
  }
  cp_async_commit();
}

// A group's factors from its stored scale bits (scale_bits_at) and zero point.
template <typename T, bool kMx>
__device__ __forceinline__ w4::Factors<T> factors_of(const Packed4Scales& s, uint32_t bits,
                                                     uint32_t zero) {
  if constexpr (kMx) return w4::mx_factors(bits);
  else return w4::int4_factors<T>(s.scale_of_bits(bits), zero);
}

// A warp's weights of one chunk, as loaded: codes, and the raw group scale
// (mxfp4: the e8m0 byte; int4: the scale's bits) and zero point of each
// step and row.
template <typename Tl>
struct Weights {
  uint2 q[Tl::kSteps][2];
  uint32_t s[Tl::kSteps][2], z[Tl::kSteps][2];
};

// T: of a, out and bias (and the MMA); kMx: mxfp4 (bf16 only) or int4.
// shift: log2 of the group when a power of two, else -1.
template <typename T, typename Tl, bool kMx>
__global__ void __launch_bounds__(kThreads, 2) w4_kernel(GroupedGemmParams p, int shift) {
  constexpr int kNT = Tl::kTok / 8, kSplit = Tl::kSplit;
  const tiles::Tile tile =
      tiles::find_tile<Tl::kTok, kThreads>(p.expert_offsets, p.num_experts, p.rows, blockIdx.x);
  if (tile.expert == -2) return;
  const int64_t n = p.n, k = p.k, n0 = int64_t(blockIdx.y) * Tl::kRowsN;
  T* out = static_cast<T*>(p.out) + tile.row0 * n;
  if (tile.expert == -1) return tiles::zero_rows(out, n, tile.rows, n0, Tl::kRowsN);

  extern __shared__ uint4 smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [2][kTok][kLd]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wn = warp % (kWarps / kSplit), wk = warp / (kWarps / kSplit);
  const int64_t e = tile.expert;
  const Packed4Scales& s4 = p.w4;
  int64_t rows[2];
  const uint8_t* w[2];
  for (int r = 0; r < 2; ++r) {
    rows[r] = min(n0 + wn * 16 + g + 8 * r, n - 1);  // past N: read row N-1, dropped
    w[r] = static_cast<const uint8_t*>(p.w) + e * p.w_expert_stride + rows[r] * p.w_row_stride;
  }
  const T* a = static_cast<const T*>(p.a) + tile.row0 * p.a_stride;
  const int chunks = int(ceil_div(k, Tl::kCols));
  auto units_of = [&](int c) { return int(min(int64_t(Tl::kUnits), (k - int64_t(c) * Tl::kCols) / kUnit)); };
  auto load = [&](Weights<Tl>& wt, int c) {
    const int units = units_of(c);
#pragma unroll
    for (int i = 0; i < Tl::kSteps; ++i) {
      if (wk + i * kSplit >= units) break;
      const int64_t col = int64_t(c) * Tl::kCols + (wk + i * kSplit) * kUnit + 16 * t;
      const int64_t group = shift >= 0 ? col >> shift : col / s4.group;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        wt.q[i][r] = load_weights(w[r] + col / 2);
        const int64_t at = s4.group_index(e, rows[r], group);
        // Raw loads only: an operation on a loaded value here would wait
        // for it, and the loads are meant to fly while chunk c multiplies.
        wt.s[i][r] = s4.scale_bits_at(at);
        if constexpr (!kMx) {
          wt.z[i][r] = 8u;
          if (s4.zero) wt.z[i][r] = s4.zero[at];
        }
      }
    }
  };
  float acc[kNT][4] = {};
  auto multiply = [&](const Weights<Tl>& wt, const T* x0, int units) {
#pragma unroll
    for (int i = 0; i < Tl::kSteps; ++i) {
      const int u = wk + i * kSplit;
      if (u >= units) break;
      uint32_t A[2][2][4];  // [row g, g + 8][word][pair]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const w4::Factors<T> f = factors_of<T, kMx>(s4, wt.s[i][r], wt.z[i][r]);
        w4::decode_word<T, kMx>(wt.q[i][r].x, f, A[r][0]);
        w4::decode_word<T, kMx>(wt.q[i][r].y, f, A[r][1]);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const T* x = x0 + (nt * 8 + g) * Tl::kLd + u * kUnit + 16 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // word h: 8 columns, two MMAs
          const uint4 b = *reinterpret_cast<const uint4*>(x + 8 * h);
          w4::mma16816<T>(acc[nt], A[0][h][0], A[1][h][0], A[0][h][1], A[1][h][1], b.x, b.y);
          w4::mma16816<T>(acc[nt], A[0][h][2], A[1][h][2], A[0][h][3], A[1][h][3], b.z, b.w);
        }
      }
    }
  };
  Weights<Tl> cur, next;
  load(cur, 0);
  stage<T, Tl>(xs, a, p.a_stride, tile.rows, k, 0);
  for (int c = 0; c < chunks; ++c) {
    const bool more = c + 1 < chunks;
    if (more) {
      stage<T, Tl>(xs + ((c + 1) & 1) * Tl::kStage, a, p.a_stride, tile.rows, k,
                   int64_t(c + 1) * Tl::kCols);
      load(next, c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c staged by every thread
    multiply(cur, xs + (c & 1) * Tl::kStage, units_of(c));
    __syncthreads();  // its buffer is free for chunk c + 2
    cur = next;
  }
  if constexpr (kSplit > 1) {
    // Warps wk > 0 leave their sums in smem; wk = 0 adds them in order.
    constexpr int kVals = kNT * 4, kSlices = kWarps / kSplit;
    float* partial = reinterpret_cast<float*>(smem);  // [kSplit - 1][kSlices][32][kVals]
    if (wk > 0) {
      float* mine = partial + ((wk - 1) * kSlices + wn) * 32 * kVals + lane * kVals;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        for (int v = 0; v < 4; ++v) mine[nt * 4 + v] = acc[nt][v];
    }
    __syncthreads();
    if (wk > 0) return;
    for (int sp = 1; sp < kSplit; ++sp) {
      const float* theirs = partial + ((sp - 1) * kSlices + wn) * 32 * kVals + lane * kVals;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        for (int v = 0; v < 4; ++v) acc[nt][v] += theirs[nt * 4 + v];
    }
  }
  // c0, c1: weight row g, tokens 2t, 2t + 1; c2, c3: row g + 8.
  const T* bias = p.bias ? static_cast<const T*>(p.bias) + e * n : nullptr;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t col = n0 + wn * 16 + g + 8 * r;
    if (col >= n) continue;
    const float b = bias ? to_float(bias[col]) : 0.0f;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const int tok = nt * 8 + 2 * t + v;
        if (tok < tile.rows) out[tok * n + col] = from_float<T>(acc[nt][2 * r + v] + b);
      }
    }
  }
}

template <typename T, int kTok, int kSplit, bool kMx>
void launch_tile(const GroupedGemmParams& p, int shift, cudaStream_t stream) {
  using Tl = Tiling<kTok, kSplit>;
  constexpr int kRowsN = Tl::kRowsN;
  constexpr size_t kSmem = 2 * size_t(Tl::kStage) * sizeof(T);
  static_assert((kSplit - 1) * kWarps / kSplit * 32 * kTok / 2 * sizeof(float) <= kSmem,
                "the partial sums fit where a was staged");
  auto kernel = w4_kernel<T, Tl, kMx>;
  static const bool opted_in = [&] {  // once per kernel: past 48 KiB needs it
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(kSmem)),
               "grouped_gemm (4-bit)");
    return true;
  }();
  (void)opted_in;
  const dim3 grid(grid_size(tiles::worst_case_tiles(p.rows, p.num_experts, kTok), "grouped_gemm"),
                  static_cast<unsigned>(ceil_div(p.n, kRowsN)));
  kernel<<<grid, kThreads, kSmem, stream>>>(p, shift);
}

// The tile's rows from the average rows per expert: small tiles split K
// (tok8: 16 weight rows a block, each warp an eighth of K) so that decode
// still has blocks for every SM; tok: forced (8, 16, 32, 64) or 0.
template <typename T, bool kMx>
void launch_typed(const GroupedGemmParams& p, int tok, int shift, cudaStream_t stream) {
  const double rows_per_expert = double(p.rows) / p.num_experts;
  if (tok == 0) tok = rows_per_expert <= 4 ? 8 : rows_per_expert <= 12 ? 16 : rows_per_expert <= 28 ? 32 : 64;
  switch (tok) {
    case 8: return launch_tile<T, 8, 8, kMx>(p, shift, stream);
    case 16: return launch_tile<T, 16, 4, kMx>(p, shift, stream);
    case 32: return launch_tile<T, 32, 2, kMx>(p, shift, stream);
    default: return launch_tile<T, 64, 1, kMx>(p, shift, stream);
  }
}

// Experts [e0, e0 + count) of p's 4-bit w as T rows [count, N, K] in out:
// a thread per 16 codes (one group), decoded as w4_kernel decodes them.
template <typename T, bool kMx>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(GroupedGemmParams p, int e0,
                                                              int64_t packs, int shift, T* out) {
  const Packed4Scales& s4 = p.w4;
  const int64_t per_row = p.k / 16;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / per_row, col = (i - row * per_row) * 16;
    const int64_t e = e0 + row / p.n, n = row % p.n;
    const uint2 q = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(p.w) +
                                                    e * p.w_expert_stride + n * p.w_row_stride +
                                                    col / 2);
    const int64_t at = s4.group_index(e, n, shift >= 0 ? col >> shift : col / s4.group);
    const w4::Factors<T> f =
        factors_of<T, kMx>(s4, s4.scale_bits_at(at), s4.zero ? s4.zero[at] : 8u);
    alignas(16) uint32_t v[2][4];
    w4::decode_word<T, kMx>(q.x, f, v[0]);
    w4::decode_word<T, kMx>(q.y, f, v[1]);
    uint4* dst = reinterpret_cast<uint4*>(out + row * p.k + col);
    dst[0] = *reinterpret_cast<const uint4*>(v[0]), dst[1] = *reinterpret_cast<const uint4*>(v[1]);
  }
}

int log2_or_minus1(int64_t v) {
  for (int s = 0; s < 31; ++s)
    if (int64_t(1) << s == v) return s;
  return -1;
}

}  // namespace

// bf16/fp16 activations (mxfp4: bf16), K a multiple of 64, groups of 16
// columns or more in whole lane loads, 16-byte aligned rows of a and
// 8-byte aligned weight rows; sm_80 on.
bool w4_mma_fits(const GroupedGemmParams& p) {
  const DeviceInfo& d = device_info();
  const bool mx = p.w4.kind == Packed4::kMxfp4;
  const bool dtype_ok = p.dtype == ScalarType::BFloat16 || (!mx && p.dtype == ScalarType::Half);
  return p.w4.kind != Packed4::kNone && d.major >= 8 && dtype_ok && p.num_experts > 0 &&
         p.k % kUnit == 0 && p.k <= INT32_MAX && p.w4.group % 16 == 0 && aligned16(p.a) &&
         p.a_stride % 8 == 0 && reinterpret_cast<uintptr_t>(p.w) % 8 == 0 &&
         p.w_expert_stride % 8 == 0 && p.w_row_stride % 8 == 0 && p.n <= 65535LL * 64;
}

// FUSED_MOE_GEMM_CONFIG=w4_tok<8|16|32|64> forces a tile (0: the heuristic);
// w4_dequant is grouped_gemm.cu's.
int w4_forced_tile(const char* name) {
  if (!name || std::strncmp(name, "w4_tok", 6) != 0) return 0;
  const int tok = std::atoi(name + 6);
  return tok == 8 || tok == 16 || tok == 32 || tok == 64 ? tok : 0;
}

void grouped_gemm_w4(const GroupedGemmParams& p, int tok, cudaStream_t stream) {
  const int shift = log2_or_minus1(p.w4.group);
  if (p.w4.kind == Packed4::kMxfp4) launch_typed<__nv_bfloat16, true>(p, tok, shift, stream);
  else if (p.dtype == ScalarType::BFloat16) launch_typed<__nv_bfloat16, false>(p, tok, shift, stream);
  else launch_typed<__half, false>(p, tok, shift, stream);
  check_launch("grouped_gemm (4-bit)");
}

void dequantize_w4(const GroupedGemmParams& p, int e0, int count, void* out,
                   cudaStream_t stream) {
  const int shift = log2_or_minus1(p.w4.group);
  const int64_t packs = int64_t(count) * p.n * (p.k / 16);
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>(ceil_div(packs, kThreads), int64_t(device_info().sm_count) * 16));
  if (p.w4.kind == Packed4::kMxfp4) {
    dequantize_kernel<__nv_bfloat16, true>
        <<<blocks, kThreads, 0, stream>>>(p, e0, packs, shift, static_cast<__nv_bfloat16*>(out));
  } else if (p.dtype == ScalarType::BFloat16) {
    dequantize_kernel<__nv_bfloat16, false>
        <<<blocks, kThreads, 0, stream>>>(p, e0, packs, shift, static_cast<__nv_bfloat16*>(out));
  } else {
    dequantize_kernel<__half, false>
        <<<blocks, kThreads, 0, stream>>>(p, e0, packs, shift, static_cast<__half*>(out));
  }
  check_launch("grouped_gemm (4-bit dequantize)");
}

}  // namespace fused_moe::cuda
