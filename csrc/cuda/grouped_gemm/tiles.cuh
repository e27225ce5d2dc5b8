// Row tiles of a grouped GEMM, numbered expert by expert (ceil(rows_e /
// kRows) per expert), then the rows past off[E]: each block finds its tile
// from expert_offsets on the device, so a tile never straddles two experts
// and nothing syncs with the host. The fallback and the 4-bit kernels share it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace fused_moe::cuda::tiles {

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
__device__ __forceinline__ int64_t clamped(const int32_t* off, int i, int64_t lo, int64_t rows) {
  return min(max(int64_t(off[i]), lo), rows);
}

// Tiles of kRows rows a grid covers in the worst case: sum_e ceil(rows_e /
// kRows) + ceil(tail / kRows) <= R / kRows + (experts with rows) + 1, and at
// most min(E, R) experts have rows. (Decode: R = 8 rows over 128 experts is
// 10 tiles, not 130.)
inline int64_t worst_case_tiles(int64_t rows, int num_experts, int tile_rows) {
  return rows / tile_rows + std::min<int64_t>(num_experts, rows) + 1;
}

// Tile number t -> Tile, for a block of kThreads threads (all must call it).
// Each thread counts the tiles of a contiguous range of experts; a block-wide
// prefix sum then tells which thread's range holds t.
template <int kRows, int kThreads>
__device__ Tile find_tile(const int32_t* off, int num_experts, int64_t rows, int64_t t) {
  __shared__ int64_t prefix[kThreads];
  __shared__ Tile found;
  const int tid = threadIdx.x;
  const int per_thread = (num_experts + kThreads - 1) / kThreads;
  const int e_begin = min(num_experts, tid * per_thread);
  const int e_end = min(num_experts, e_begin + per_thread);
  auto tiles_of = [&](int e, int64_t begin) {
    return (clamped(off, e + 1, begin, rows) - begin + kRows - 1) / kRows;
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
        const int64_t row0 = begin + (t - first) * kRows;
        found = Tile{e, row0, int(min(int64_t(kRows), clamped(off, e + 1, begin, rows) - row0))};
        break;
      }
      first += tiles;
    }
  }
  const int64_t gemm_tiles = prefix[kThreads - 1];
  if (tid == 0 && t >= gemm_tiles) {
    const int64_t row0 = clamped(off, num_experts, 0, rows) + (t - gemm_tiles) * kRows;
    if (row0 < rows) found = Tile{-1, row0, int(min(int64_t(kRows), rows - row0))};
  }
  __syncthreads();
  return found;
}

// A tile of expert -1: rows x columns [n0, n0 + cols) of out (n columns) set
// to zero by the block.
template <typename O>
__device__ void zero_rows(O* out, int64_t n, int rows, int64_t n0, int cols) {
  for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t col = n0 + i % cols;
    if (col < n) out[i / cols * n + col] = O(0.0f);
  }
}

}  // namespace fused_moe::cuda::tiles
