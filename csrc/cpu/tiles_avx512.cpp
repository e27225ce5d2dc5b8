// Tile kernels for AVX-512 (F, BW, VL and BF16; CMakeLists.txt compiles this
// file with those instructions): 6 rows by 64 columns, fp32 multiply-adds,
// bf16 by its pairwise dot product, fp16 widened to fp32 on packing.
#include "cpu/tiles.h"

#if defined(__x86_64__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's _mm512_undefined_ps initialises itself from itself, which
// -Wuninitialized reports at every unpack and conversion.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

constexpr int kRows = 6;
constexpr int kVecs = 4;  // 16-lane vectors in a panel row
constexpr int kCols = 16 * kVecs;

__m512 zeros() { return _mm512_setzero_ps(); }
__m512 as_ps(__m512d x) { return _mm512_castpd_ps(x); }
__m512d as_pd(__m512 x) { return _mm512_castps_pd(x); }

// Lane j of r[i] <-> lane i of r[j], for 16 vectors of 16 32-bit lanes.
inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // Now r[q + c] (q = 0, 4, 8, 12) holds, in its 128-bit lane l, column
  // 4l + c of rows q..q+3.
  for (int q = 0; q < 16; q += 4) {
    r[q] = as_ps(_mm512_unpacklo_pd(as_pd(t[q]), as_pd(t[q + 2])));
    r[q + 1] = as_ps(_mm512_unpackhi_pd(as_pd(t[q]), as_pd(t[q + 2])));
    r[q + 2] = as_ps(_mm512_unpacklo_pd(as_pd(t[q + 1]), as_pd(t[q + 3])));
    r[q + 3] = as_ps(_mm512_unpackhi_pd(as_pd(t[q + 1]), as_pd(t[q + 3])));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 s0 = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88);  // lanes 0, 2
    const __m512 s1 = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xdd);  // lanes 1, 3
    const __m512 s2 = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
    const __m512 s3 = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xdd);
    r[c] = _mm512_shuffle_f32x4(s0, s2, 0x88);
    r[c + 4] = _mm512_shuffle_f32x4(s1, s3, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(s0, s2, 0xdd);
    r[c + 12] = _mm512_shuffle_f32x4(s1, s3, 0xdd);
  }
}

__mmask16 first16(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
__mmask32 first32(int64_t n) { return n >= 32 ? 0xffffffffu : (1u << n) - 1; }

// Bytes ahead of the current load that packing prefetches in each weight
// row: its 16 rows are 16 short streams (a page or two each), which the
// hardware prefetcher alone does not run far enough ahead of.
constexpr int64_t kPrefetchBytes = 512;

// Packs 16 columns at a time: load(row, k0, n) reads the `step` elements
// from k0 of a weight row (n of them valid) as 16 32-bit lanes; 16 rows
// transposed give the next 16 of the panel's `units` rows of 32-bit entries.
template <int64_t kBytes, typename Load>
void pack_columns(const void* const* w, int64_t k, int64_t step, int64_t units, float* panel,
                  const Load& load) {
  const __m512 zero = zeros();
  for (int g = 0; g < kVecs; ++g) {
    const char* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = static_cast<const char*>(w[g * 16 + i]);
    for (int64_t k0 = 0, u0 = 0; k0 < k; k0 += step, u0 += 16) {
      const int64_t n = k - k0;
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (rows[i] == nullptr) {
          r[i] = zero;
          continue;
        }
        const char* p = rows[i] + k0 * kBytes;
        if (n > step + kPrefetchBytes / kBytes) _mm_prefetch(p + kPrefetchBytes, _MM_HINT_T0);
        r[i] = load(p, n);
      }
      transpose16(r);
      const int64_t m = units - u0 < 16 ? units - u0 : 16;
      for (int i = 0; i < m; ++i) _mm512_storeu_ps(panel + (u0 + i) * kCols + g * 16, r[i]);
    }
  }
}

// fp32 panel: entry [i][j] = w[j][i].
void pack_f32(const void* const* w, int64_t k, void* panel) {
  pack_columns<4>(w, k, 16, k, static_cast<float*>(panel), [](const char* p, int64_t n) {
    const auto* x = reinterpret_cast<const float*>(p);
    return n >= 16 ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(first16(n), x);
  });
}

void pack_f16(const void* const* w, int64_t k, void* panel) {
  pack_columns<2>(w, k, 16, k, static_cast<float*>(panel), [](const char* p, int64_t n) {
    const __m256i h = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(first16(n), p);
    return _mm512_cvtph_ps(h);
  });
}

// bf16 panel of pairs: 32-bit entry [i][j] = (w[j][2i], w[j][2i + 1]), the
// last pair of an odd k completed by a zero.
void pack_bf16(const void* const* w, int64_t k, void* panel) {
  pack_columns<2>(w, k, 32, (k + 1) / 2, static_cast<float*>(panel), [](const char* p, int64_t n) {
    return n >= 32 ? _mm512_loadu_ps(p) : _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(first32(n), p));
  });
}

template <int R>
void tile_f32_rows(const void* const* rows, const float* panel, int64_t k, float* c) {
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = static_cast<const float*>(rows[r]);
  __m512 acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) acc[r][q] = zeros();
  for (int64_t i = 0; i < k; ++i) {
    const float* p = panel + i * kCols;
    __m512 b[kVecs];
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) b[q] = _mm512_loadu_ps(p + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][i]);
#pragma GCC unroll 4
      for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm512_fmadd_ps(x, b[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kVecs; ++q) _mm512_storeu_ps(c + r * kCols + 16 * q, acc[r][q]);
}

template <int R>
void tile_bf16_rows(const void* const* rows, const float* panel, int64_t k, float* c) {
  const uint16_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = static_cast<const uint16_t*>(rows[r]);
  __m512 acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) acc[r][q] = zeros();
  const int64_t pairs = k / 2;
  auto step = [&](int64_t i, auto pair) {
    const float* p = panel + i * kCols;
    __m512bh b[kVecs];
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) b[q] = (__m512bh)_mm512_loadu_ps(p + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh x = pair(a[r], i);
#pragma GCC unroll 4
      for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], x, b[q]);
    }
  };
  // Each row's pair (a[2i], a[2i + 1]) broadcast; an odd k's last element
  // pairs with a zero, as in the panel.
  for (int64_t i = 0; i < pairs; ++i) {
    step(i, [](const uint16_t* row, int64_t j) {
      uint32_t v;
      std::memcpy(&v, row + 2 * j, sizeof(v));
      return (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
    });
  }
  if (k % 2) {
    step(pairs, [](const uint16_t* row, int64_t j) {
      return (__m512bh)_mm512_set1_epi32(row[2 * j]);
    });
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kVecs; ++q) _mm512_storeu_ps(c + r * kCols + 16 * q, acc[r][q]);
}

// Calls f(std::integral_constant<int, n>) for n in 1..kRows.
template <typename F>
void by_rows(int n, const F& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 6>{});
  }
}

void tile_f32(const void* const* a, int n, const void* panel, int64_t k, float* c) {
  by_rows(n, [&](auto r) { tile_f32_rows<r()>(a, static_cast<const float*>(panel), k, c); });
}

void tile_bf16(const void* const* a, int n, const void* panel, int64_t k, float* c) {
  by_rows(n, [&](auto r) { tile_bf16_rows<r()>(a, static_cast<const float*>(panel), k, c); });
}

static_assert(kRows == 6, "by_rows covers 1..6 rows");

const TileKernels kTiles = {
    "avx512",
    kRows,
    kCols,
    {pack_f32, pack_bf16, pack_f16},
    {tile_f32, tile_bf16, tile_f32},
    {kF32, kBF16, kF32},
    &kEpilogues,
};

}  // namespace

const TileKernels* avx512_tiles() { return &kTiles; }

}  // namespace fused_moe::cpu

#else

namespace fused_moe::cpu {
const TileKernels* avx512_tiles() { return nullptr; }
}  // namespace fused_moe::cpu

#endif
