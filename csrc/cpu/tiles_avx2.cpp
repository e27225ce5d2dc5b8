// Tile kernels for AVX2 with FMA and F16C (CMakeLists.txt compiles this file
// with those instructions): 8-lane partial sums of fp32 multiply-adds; bf16
// and fp16 weights widened as they are read, their A rows arrive widened.
#include "cpu/tiles.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

constexpr int kRows = 4;
constexpr int kCols = 32;

// How elements of type E are stored: fp32 as float, bf16 and fp16 as their bits.
template <Elem E>
using Stored = std::conditional_t<E == kF32, float, uint16_t>;

// 8 elements from p as floats; past n, zeros.
template <Elem E>
__m256 load8(const Stored<E>* p, int64_t n) {
  Stored<E> part[8] = {};
  if (n < 8) {
    std::memcpy(part, p, n * sizeof(part[0]));
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

// out[i] = the sum of v[i]'s 8 lanes, for 8 vectors at once, every output
// through the same tree (lanes l and l + 4, then pairs, then the two left).
inline __attribute__((always_inline)) __m256 reduce8(const __m256 v[8]) {
  __m256 s[4];
  for (int i = 0; i < 4; ++i)  // v[2i] in the low 128 bits, v[2i + 1] in the high
    s[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  const __m256 t0 = _mm256_hadd_ps(s[0], s[1]), t1 = _mm256_hadd_ps(s[2], s[3]);
  // Lanes 0..3: outputs 0, 2, 4, 6; lanes 4..7: outputs 1, 3, 5, 7.
  const __m256 r = _mm256_hadd_ps(t0, t1);
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// s[r * C + j] = a[r] . w[j] over k, for R rows of fp32 and C weight rows of E.
template <Elem E, int R, int C>
void dot_block(const float* const* a, const Stored<E>* const* w, int64_t k, float* s) {
  static_assert(R * C <= 8, "one reduce8");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  auto step = [&](int64_t i, int64_t n) {
    __m256 av[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) av[r] = load8<kF32>(a[r] + i, n);
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {
      const __m256 wv = load8<E>(w[j] + i, n);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r * C + j] = _mm256_fmadd_ps(av[r], wv, acc[r * C + j]);
    }
  };
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) step(i, 8);
  if (i < k) step(i, k - i);
  _mm256_storeu_ps(s, reduce8(acc));
}

// c[r * ldc + j] for n_a <= R rows and n_w weight rows, C at a time; short
// blocks repeat their last row (same sums, not stored).
template <Elem E, int R, int C>
void dot_rows(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k, float* c,
              int ldc) {
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = static_cast<const float*>(a[r < n_a ? r : n_a - 1]);
  for (int j0 = 0; j0 < n_w; j0 += C) {
    const int m = n_w - j0 < C ? n_w - j0 : C;
    const Stored<E>* wr[C];
    for (int j = 0; j < C; ++j) wr[j] = static_cast<const Stored<E>*>(w[j0 + (j < m ? j : m - 1)]);
    float s[8];
    dot_block<E, R, C>(ar, wr, k, s);
    for (int r = 0; r < n_a; ++r)
      for (int j = 0; j < m; ++j) c[r * ldc + j0 + j] = s[r * C + j];
  }
}

template <Elem E>
void dot(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k, float* c, int ldc) {
  switch (n_a) {
    case 1: return dot_rows<E, 1, 8>(a, n_a, w, n_w, k, c, ldc);
    case 2: return dot_rows<E, 2, 4>(a, n_a, w, n_w, k, c, ldc);
    default: return dot_rows<E, 4, 2>(a, n_a, w, n_w, k, c, ldc);
  }
}
static_assert(kRows == 4, "dot covers 1..4 rows");

const TileKernels kTiles = {
    "avx2", kRows, kCols, {dot<kF32>, dot<kBF16>, dot<kF16>}, {kF32, kF32, kF32}, &kEpilogues,
};

}  // namespace

const TileKernels* avx2_tiles() { return &kTiles; }

}  // namespace fused_moe::cpu

#else

namespace fused_moe::cpu {
const TileKernels* avx2_tiles() { return nullptr; }
}  // namespace fused_moe::cpu

#endif
