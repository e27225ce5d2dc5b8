// The grouped GEMM for every case the sm90 kernels do not take: Ampere, fp32,
// N or K not multiples of 8, unaligned pointers, FP8 scales other than
// DeepSeek's blocks, 4-bit weights. Correct for any shape; fast enough to be
// the Ampere path (tensor-core mma.sync for bf16/fp16). FP8 tiles are dequantized to bf16 as
// they are loaded into shared memory (any scale grid), then multiplied as bf16;
// 4-bit weight tiles (mxfp4, int4) are dequantized to the activations' type
// the same way (fp32 activations: fp32 FMAs, as the fp32 path).
//
// A block's rows are a tile of one expert (tiles.cuh).
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
#include "cuda/grouped_gemm/tiles.cuh"

namespace fused_moe::cuda {
namespace {

using namespace cute;

constexpr int kBM = 64;   // rows of a, all of one expert
constexpr int kBN = 128;  // rows of w[e] = columns of out
constexpr int kBK = 32;
constexpr int kThreads = 128;

// What the tiles are loaded from: a and w of the MMA's type; both e4m3 (times
// their scales); a of the MMA's type and w packed 4-bit (GroupedGemmParams.w4).
enum class Inputs { kPlain, kFp8, kPacked4 };

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

// The float of e2m1 code c (sign in bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3,
// 4, 6) from its bits: no table, so nothing lands in local memory.
__device__ __forceinline__ float e2m1(uint32_t c) {
  const uint32_t m = c & 7;
  const uint32_t magnitude = m < 2 ? m * 0x3f000000u : ((m >> 1) + 126u) << 23 | (m & 1) << 22;
  return __uint_as_float(magnitude | (c & 8) << 28);
}

// load_tile for 4-bit w: smem[r][c] = s.value(expert, row0 + r, k0 + c, code),
// rounded to T (the same floats: e2m1(code) * scale, or (code - zero) * scale),
// from the packed rows of src (`ld` bytes apart, two codes a byte, the even k
// in the low nibble); zero outside rows x k. A thread takes 16 codes (8
// bytes, one 8-byte load when `vectors`), each byte read once; K is even, so
// both codes of a byte are in or out, and a group (even) never splits a byte.
template <int kRows, class T>
__device__ void load_tile_w4(T* smem, const uint8_t* src, int64_t ld, int rows, int64_t k,
                             int64_t k0, bool vectors, const Packed4Scales& s, int64_t expert,
                             int64_t row0) {
  constexpr int kPack = 16, kBytes = kPack / 2, kPerRow = kBK / kPack;
  // A pack (16 codes from a multiple of 16) lies in one group then.
  const bool one_scale = s.group % kPack == 0;
  const bool mx = s.kind == Packed4::kMxfp4;
  for (int i = threadIdx.x; i < kRows * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = i % kPerRow * kPack;
    const int64_t col = k0 + c;
    const int in = r < rows ? int(min(int64_t(kPack), max(int64_t(0), k - col))) : 0;  // codes in K
    const uint8_t* bytes = src + r * ld + col / 2;
    uint8_t q[kBytes] = {};
    if (in == kPack && vectors) {
      *reinterpret_cast<uint2*>(q) = *reinterpret_cast<const uint2*>(bytes);
    } else {
      for (int j = 0; j < kBytes; ++j)
        if (2 * j < in) q[j] = bytes[j];
    }
    const int64_t s_row = expert * s.expert_stride + (row0 + r) * s.row_stride;
    float scale = 0.0f;
    int zero = 0;
    auto group_of = [&](int64_t col_j) {
      const int64_t at = s_row + col_j / s.group;
      scale = s.scale_at(at);
      zero = mx ? 0 : s.zero ? s.zero[at] : 8;
    };
    if (one_scale && in > 0) group_of(col);
    alignas(16) T v[kPack];
#pragma unroll
    for (int j = 0; j < kBytes; ++j) {
      const bool byte_in = 2 * j < in;
      if (!one_scale && byte_in) group_of(col + 2 * j);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t code = q[j] >> (4 * h) & 15u;
        const float x = mx ? e2m1(code) * scale : float(int(code) - zero) * scale;
        v[2 * j + h] = T(byte_in ? x : 0.0f);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(smem + r * kLd<T> + c);
#pragma unroll
    for (int j = 0; j < int(sizeof(v) / 16); ++j) dst[j] = reinterpret_cast<const uint4*>(v)[j];
  }
}

// T: of the MMA (and of a, w unless e4m3 or 4-bit); O: of out and bias.
template <class T, class O, Inputs kIn>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(GroupedGemmParams p, bool vectors) {
  const tiles::Tile tile =
      tiles::find_tile<kBM, kThreads>(p.expert_offsets, p.num_experts, p.rows, blockIdx.x);
  if (tile.expert == -2) return;
  const int64_t n = p.n, k = p.k;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  O* out = static_cast<O*>(p.out) + tile.row0 * n;

  if (tile.expert == -1) return tiles::zero_rows(out, n, tile.rows, n0, kBN);

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

  using A = std::conditional_t<kIn == Inputs::kFp8, uint8_t, T>;
  using W = std::conditional_t<kIn == Inputs::kPlain, T, uint8_t>;
  const A* a = static_cast<const A*>(p.a) + tile.row0 * p.a_stride;
  const W* w = static_cast<const W*>(p.w) + tile.expert * p.w_expert_stride + n0 * p.w_row_stride;
  const int w_rows = int(min(int64_t(kBN), n - n0));
  for (int64_t k0 = 0; k0 < k; k0 += kBK) {
    if constexpr (kIn == Inputs::kFp8) {
      load_tile_fp8<kBM>(smem_a, a, p.a_stride, tile.rows, k, k0, vectors, p.a_scale, 0, tile.row0);
      load_tile_fp8<kBN>(smem_b, w, p.w_row_stride, w_rows, k, k0, vectors, p.w_scale,
                         tile.expert, n0);
    } else if constexpr (kIn == Inputs::kPacked4) {
      load_tile<kBM>(smem_a, a, p.a_stride, tile.rows, k, k0, vectors);
      load_tile_w4<kBN>(smem_b, w, p.w_row_stride, w_rows, k, k0, vectors, p.w4, tile.expert, n0);
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

template <class T, class O = T, Inputs kIn = Inputs::kPlain>
void launch(const GroupedGemmParams& p, cudaStream_t stream) {
  // 16-byte loads need K and the strides in whole vectors and 16-byte aligned
  // bases; 4-bit w is read 8 bytes (16 codes) at a time, a 16 bytes.
  bool vectors;
  if constexpr (kIn == Inputs::kPacked4) {
    vectors = p.k % 16 == 0 && aligned16(p.a) && p.a_stride % kVec<T> == 0 &&
              reinterpret_cast<uintptr_t>(p.w) % 8 == 0 && p.w_expert_stride % 8 == 0 &&
              p.w_row_stride % 8 == 0;
  } else {
    const int64_t vec = kIn == Inputs::kFp8 ? 16 : kVec<T>;
    vectors = p.k % vec == 0 && aligned16(p.a) && aligned16(p.w) && p.a_stride % vec == 0 &&
              p.w_expert_stride % vec == 0 && p.w_row_stride % vec == 0;
  }
  const dim3 grid(grid_size(tiles::worst_case_tiles(p.rows, p.num_experts, kBM), "grouped_gemm"),
                  static_cast<unsigned>((p.n + kBN - 1) / kBN));
  grouped_gemm_kernel<T, O, kIn><<<grid, kThreads, 0, stream>>>(p, vectors);
}

// FP8 inputs: bf16 MMAs, out in p.dtype.
void launch_fp8(const GroupedGemmParams& p, cudaStream_t stream) {
  using Bf16 = cutlass::bfloat16_t;
  if (p.dtype == ScalarType::BFloat16) launch<Bf16, Bf16, Inputs::kFp8>(p, stream);
  else if (p.dtype == ScalarType::Half) launch<Bf16, cutlass::half_t, Inputs::kFp8>(p, stream);
  else if (p.dtype == ScalarType::Float) launch<Bf16, float, Inputs::kFp8>(p, stream);
  else fail("grouped_gemm: out_dtype must be bfloat16, float16 or float32");
}

// 4-bit weights: MMAs (and out) in the activations' type.
void launch_w4(const GroupedGemmParams& p, cudaStream_t stream) {
  using Bf16 = cutlass::bfloat16_t;
  using Half = cutlass::half_t;
  if (p.w4.group < 2 || p.w4.group % 2 != 0)
    fail("grouped_gemm: 4-bit weight groups must be even (2 or more columns)");
  if (p.dtype == ScalarType::BFloat16) launch<Bf16, Bf16, Inputs::kPacked4>(p, stream);
  else if (p.dtype == ScalarType::Half) launch<Half, Half, Inputs::kPacked4>(p, stream);
  else if (p.dtype == ScalarType::Float) launch<float, float, Inputs::kPacked4>(p, stream);
  else fail("grouped_gemm: with 4-bit weights, a must be bfloat16, float16 or float32");
}

}  // namespace

void grouped_gemm_fallback(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.w4.kind != Packed4::kNone) {
    launch_w4(p, stream);
  } else if (p.fp8) {
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
