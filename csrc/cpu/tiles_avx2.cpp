// Tile kernels for AVX2 with FMA and F16C (CMakeLists.txt compiles this file
// with those instructions): 4 rows by 24 columns of fp32 multiply-adds, bf16
// and fp16 weights widened to fp32 on packing (their A rows arrive widened).
#include "cpu/tiles.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

constexpr int kRows = 4;
constexpr int kVecs = 3;  // 8-lane vectors in a panel row
constexpr int kCols = 8 * kVecs;

// Lane j of r[i] <-> lane i of r[j], for 8 vectors of 8 floats.
void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int q = 0; q < 8; q += 4) {
    u[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
    u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xee);
    u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}

// How elements of type E are stored: fp32 as float, bf16 and fp16 as their bits.
template <Elem E>
using Stored = std::conditional_t<E == kF32, float, uint16_t>;

// 8 elements of a row from k0 as floats; past the row's end (k), zeros.
template <Elem E>
__m256 load8(const Stored<E>* row, int64_t k0, int64_t k) {
  Stored<E> part[8] = {};
  const Stored<E>* p = row + k0;
  if (k - k0 < 8) {
    std::memcpy(part, p, (k - k0) * sizeof(part[0]));
    p = part;
  }
  if constexpr (E == kF32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (E == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// fp32 panel: entry [i][j] = w[j][i], widened from E.
template <Elem E>
void pack(const void* const* w, int64_t k, void* out) {
  float* panel = static_cast<float*>(out);
  for (int g = 0; g < kVecs; ++g) {
    for (int64_t k0 = 0; k0 < k; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const auto* row = static_cast<const Stored<E>*>(w[g * 8 + i]);
        r[i] = row ? load8<E>(row, k0, k) : _mm256_setzero_ps();
      }
      transpose8(r);
      const int64_t n = k - k0 < 8 ? k - k0 : 8;
      for (int i = 0; i < n; ++i) _mm256_storeu_ps(panel + (k0 + i) * kCols + g * 8, r[i]);
    }
  }
}

template <int R>
void tile_rows(const void* const* rows, const float* panel, int64_t k, float* c) {
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = static_cast<const float*>(rows[r]);
  __m256 acc[R][kVecs];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const float* p = panel + i * kCols;
    __m256 b[kVecs];
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) b[q] = _mm256_loadu_ps(p + 8 * q);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a[r] + i);
#pragma GCC unroll 4
      for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm256_fmadd_ps(x, b[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kVecs; ++q) _mm256_storeu_ps(c + r * kCols + 8 * q, acc[r][q]);
}

void tile(const void* const* a, int n, const void* panel, int64_t k, float* c) {
  const float* p = static_cast<const float*>(panel);
  switch (n) {
    case 1: return tile_rows<1>(a, p, k, c);
    case 2: return tile_rows<2>(a, p, k, c);
    case 3: return tile_rows<3>(a, p, k, c);
    default: return tile_rows<4>(a, p, k, c);
  }
}
static_assert(kRows == 4, "tile covers 1..4 rows");

const TileKernels kTiles = {
    "avx2",
    kRows,
    kCols,
    {pack<kF32>, pack<kBF16>, pack<kF16>},
    {tile, tile, tile},
    {kF32, kF32, kF32},
    &kEpilogues,
};

}  // namespace

const TileKernels* avx2_tiles() { return &kTiles; }

}  // namespace fused_moe::cpu

#else

namespace fused_moe::cpu {
const TileKernels* avx2_tiles() { return nullptr; }
}  // namespace fused_moe::cpu

#endif
