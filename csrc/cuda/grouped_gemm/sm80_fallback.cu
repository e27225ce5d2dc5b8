// The grouped GEMM for every case the sm90 kernels do not take: Ampere, fp32,
// N or K not multiples of 8, unaligned pointers, FP8 scales other than
// DeepSeek's blocks. Correct for any shape; fast enough to be the Ampere path
// (tensor-core mma.sync for bf16/fp16). FP8 tiles are dequantized to bf16 as
// they are loaded into shared memory (any scale grid), then multiplied as bf16.
//
// Tiles are numbered expert by expert (ceil(rows_e / kBM) per expert), then
// the rows past off[E]; each block finds its tile from expert_offsets on the
// device, so a tile never straddles two experts and nothing syncs with the host.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

using namespace cute;

constexpr int kBM = 64;   // rows of a, all of one expert
constexpr int kBN = 128;  // rows of w[e] = columns of out
constexpr int kBK = 32;
constexpr int kThreads = 128;

// Each smem row is padded by one 16-byte vector so that the MMA's fragment
// reads of eight consecutive rows fall in distinct banks.
template <class T>
constexpr int kLd = kBK + kVec<T>;

// Four warps; 16-bit types use mma.sync m16n8k16 with fp32 accumulate.
template <class T>
struct Mma;
template <>
struct Mma<cutlass::bfloat16_t> {
  using Tiled = decltype(make_tiled_mma(SM80_16x8x16_F32BF16BF16F32_TN{}, Layout<Shape<_2, _2, _1>>{}));
};
template <>
struct Mma<cutlass::half_t> {
  using Tiled = decltype(make_tiled_mma(SM80_16x8x16_F32F16F16F32_TN{}, Layout<Shape<_2, _2, _1>>{}));
};
template <>
struct Mma<float> {
  using Tiled = decltype(make_tiled_mma(UniversalFMA<float, float, float, float>{},
                                        Layout<Shape<_16, _8, _1>>{}));
};

// expert >= 0: rows [row0, row0 + rows) of that expert; -1: rows past off[E]
// to zero; -2: no work (the grid is sized for the worst case).
struct Tile {
  int expert;
  int64_t row0;
  int rows;
};

// Rows [begin, end) of expert e, offsets clamped to [0, rows] and made
// non-decreasing per expert: bad offsets (checked only on the CPU) can give
// wrong rows but never an access out of bounds.
__device__ int64_t clamped(const int32_t* off, int i, int64_t lo, int64_t rows) {
  return min(max(int64_t(off[i]), lo), rows);
}

// Tile number t -> Tile. Each thread counts the tiles of a contiguous range of
// experts; a block-wide prefix sum then tells which thread's range holds t.
__device__ Tile find_tile(const int32_t* off, int num_experts, int64_t rows, int64_t t) {
  __shared__ int64_t prefix[kThreads];
  __shared__ Tile found;
  const int tid = threadIdx.x;
  const int per_thread = (num_experts + kThreads - 1) / kThreads;
  const int e_begin = min(num_experts, tid * per_thread);
  const int e_end = min(num_experts, e_begin + per_thread);
  auto tiles_of = [&](int e, int64_t begin) {
    return (clamped(off, e + 1, begin, rows) - begin + kBM - 1) / kBM;
  };
  int64_t count = 0;
  for (int e = e_begin; e < e_end; ++e) count += tiles_of(e, clamped(off, e, 0, rows));
  prefix[tid] = count;
  if (tid == 0) found = Tile{-2, 0, 0};
  __syncthreads();
  for (int d = 1; d < kThreads; d *= 2) {  // inclusive scan
    const int64_t add = tid >= d ? prefix[tid - d] : 0;
    __syncthreads();
    prefix[tid] += add;
    __syncthreads();
  }
  int64_t first = prefix[tid] - count;
  if (t >= first && t < prefix[tid]) {
    for (int e = e_begin; e < e_end; ++e) {
      const int64_t begin = clamped(off, e, 0, rows);
      const int64_t tiles = tiles_of(e, begin);
      if (t < first + tiles) {
        const int64_t row0 = begin + (t - first) * kBM;
        found = Tile{e, row0, int(min(int64_t(kBM), clamped(off, e + 1, begin, rows) - row0))};
        break;
      }
      first += tiles;
    }
  }
  const int64_t gemm_tiles = prefix[kThreads - 1];
  if (tid == 0 && t >= gemm_tiles) {
    const int64_t row0 = clamped(off, num_experts, 0, rows) + (t - gemm_tiles) * kBM;
    if (row0 < rows) found = Tile{-1, row0, int(min(int64_t(kBM), rows - row0))};
  }
  __syncthreads();
  return found;
}

// smem[r][c] = src[r][k0 + c] for r < kRows, c < kBK (src rows `ld` apart);
// zero outside rows x k.
template <int kRows, class T>
__device__ void load_tile(T* smem, const T* src, int64_t ld, int rows, int64_t k, int64_t k0,
                          bool vectors) {
  constexpr int kPerRow = kBK / kVec<T>;
  for (int i = threadIdx.x; i < kRows * kPerRow; i += kThreads) {
    const int r = i / kPerRow;
    const int c = i % kPerRow * kVec<T>;
    T* dst = smem + r * kLd<T> + c;
    if (r < rows && vectors && k0 + c + kVec<T> <= k) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src + r * ld + k0 + c);
    } else {
      for (int j = 0; j < kVec<T>; ++j) {
        dst[j] = r < rows && k0 + c + j < k ? src[r * ld + k0 + c + j] : T(0);
      }
    }
  }
}

// load_tile for e4m3 rows: each element times its scale s.at(expert, row0 +
// r, k0 + c), rounded to T (bf16).
template <int kRows, class T>
__device__ void load_tile_fp8(T* smem, const uint8_t* src, int64_t ld, int rows, int64_t k,
                              int64_t k0, bool vectors, const ScaleGrid& s, int64_t expert,
                              int64_t row0) {
  constexpr int kPack = 16, kPerRow = kBK / kPack;
  // A pack (16 columns from a multiple of 16) lies in one scale block then.
  const bool one_scale = s.cols_per % kPack == 0;
  for (int i = threadIdx.x; i < kRows * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = i % kPerRow * kPack;
    uint8_t q[kPack] = {};
    const bool whole = r < rows && vectors && k0 + c + kPack <= k;
    if (whole) {
      *reinterpret_cast<uint4*>(q) = *reinterpret_cast<const uint4*>(src + r * ld + k0 + c);
    } else {
      for (int j = 0; j < kPack; ++j)
        if (r < rows && k0 + c + j < k) q[j] = src[r * ld + k0 + c + j];
    }
    const float scale = r < rows && one_scale ? s.at(expert, row0 + r, k0 + c) : 0.0f;
    for (int j = 0; j < kPack; ++j) {
      __nv_fp8_e4m3 f;
      f.__x = q[j];
      const bool in = r < rows && k0 + c + j < k;
      const float sj = one_scale ? scale : in ? s.at(expert, row0 + r, k0 + c + j) : 0.0f;
      smem[r * kLd<T> + c + j] = T(in ? float(f) * sj : 0.0f);
    }
  }
}

// T: of the MMA (and of a, w unless kFp8: e4m3 then); O: of out and bias.
template <class T, class O, bool kFp8>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(GroupedGemmParams p, bool vectors) {
  const Tile tile = find_tile(p.expert_offsets, p.num_experts, p.rows, blockIdx.x);
  if (tile.expert == -2) return;
  const int64_t n = p.n, k = p.k;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  O* out = static_cast<O*>(p.out) + tile.row0 * n;

  if (tile.expert == -1) {
    for (int i = threadIdx.x; i < tile.rows * kBN; i += kThreads) {
      const int64_t col = n0 + i % kBN;
      if (col < n) out[i / kBN * n + col] = O(0.0f);
    }
    return;
  }

  __shared__ alignas(16) T smem_a[kBM * kLd<T>];
  __shared__ alignas(16) T smem_b[kBN * kLd<T>];
  using Rows = Stride<Int<kLd<T>>, _1>;  // K-major, padded
  Tensor sA = make_tensor(make_smem_ptr(smem_a), make_layout(Shape<Int<kBM>, Int<kBK>>{}, Rows{}));
  Tensor sB = make_tensor(make_smem_ptr(smem_b), make_layout(Shape<Int<kBN>, Int<kBK>>{}, Rows{}));
  typename Mma<T>::Tiled mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  Tensor tCsA = thr.partition_A(sA);
  Tensor tCsB = thr.partition_B(sB);
  Tensor tCrA = thr.partition_fragment_A(sA);
  Tensor tCrB = thr.partition_fragment_B(sB);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  clear(acc);

  using In = std::conditional_t<kFp8, uint8_t, T>;
  const In* a = static_cast<const In*>(p.a) + tile.row0 * p.a_stride;
  const In* w = static_cast<const In*>(p.w) + tile.expert * p.w_expert_stride + n0 * p.w_row_stride;
  const int w_rows = int(min(int64_t(kBN), n - n0));
  for (int64_t k0 = 0; k0 < k; k0 += kBK) {
    if constexpr (kFp8) {
      load_tile_fp8<kBM>(smem_a, a, p.a_stride, tile.rows, k, k0, vectors, p.a_scale, 0, tile.row0);
      load_tile_fp8<kBN>(smem_b, w, p.w_row_stride, w_rows, k, k0, vectors, p.w_scale,
                         tile.expert, n0);
    } else {
      load_tile<kBM>(smem_a, a, p.a_stride, tile.rows, k, k0, vectors);
      load_tile<kBN>(smem_b, w, p.w_row_stride, w_rows, k, k0, vectors);
    }
    __syncthreads();
    copy(tCsA, tCrA);
    copy(tCsB, tCrB);
    gemm(mma, tCrA, tCrB, acc);
    __syncthreads();
  }

  const O* bias = p.bias ? static_cast<const O*>(p.bias) + tile.expert * n : nullptr;
  Tensor tCc = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  for (int i = 0; i < size(acc); ++i) {
    const int r = get<0>(tCc(i));
    const int64_t col = n0 + get<1>(tCc(i));
    if (r < tile.rows && col < n) {
      out[r * n + col] = O(acc(i) + (bias ? float(bias[col]) : 0.0f));
    }
  }
}

template <class T, class O = T, bool kFp8 = false>
void launch(const GroupedGemmParams& p, cudaStream_t stream) {
  // 16-byte loads need K and the strides in whole vectors and 16-byte aligned bases.
  const int64_t vec = kFp8 ? 16 : kVec<T>;
  const bool vectors = p.k % vec == 0 && aligned16(p.a) && aligned16(p.w) &&
                       p.a_stride % vec == 0 && p.w_expert_stride % vec == 0 &&
                       p.w_row_stride % vec == 0;
  // sum_e ceil(rows_e / kBM) + ceil(tail / kBM) <= R / kBM + E + 1 tiles.
  const dim3 grid(static_cast<unsigned>(p.rows / kBM + p.num_experts + 1),
                  static_cast<unsigned>((p.n + kBN - 1) / kBN));
  grouped_gemm_kernel<T, O, kFp8><<<grid, kThreads, 0, stream>>>(p, vectors);
}

// FP8 inputs: bf16 MMAs, out in p.dtype.
void launch_fp8(const GroupedGemmParams& p, cudaStream_t stream) {
  using Bf16 = cutlass::bfloat16_t;
  if (p.dtype == ScalarType::BFloat16) launch<Bf16, Bf16, true>(p, stream);
  else if (p.dtype == ScalarType::Half) launch<Bf16, cutlass::half_t, true>(p, stream);
  else if (p.dtype == ScalarType::Float) launch<Bf16, float, true>(p, stream);
  else fail("grouped_gemm: out_dtype must be bfloat16, float16 or float32");
}

}  // namespace

void grouped_gemm_fallback(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.fp8) {
    launch_fp8(p, stream);
  } else if (p.dtype == ScalarType::BFloat16) {
    launch<cutlass::bfloat16_t>(p, stream);
  } else if (p.dtype == ScalarType::Half) {
    launch<cutlass::half_t>(p, stream);
  } else if (p.dtype == ScalarType::Float) {
    launch<float>(p, stream);
  } else {
    fail("grouped_gemm: dtype must be bfloat16, float16 or float32");
  }
  check_launch("grouped_gemm (fallback)");
}

}  // namespace fused_moe::cuda
