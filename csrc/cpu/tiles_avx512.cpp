// Tile kernels for AVX-512 (F, BW, VL and BF16; CMakeLists.txt compiles this
// file with those instructions): 16-lane partial sums, fp32 multiply-adds,
// bf16 by its pairwise dot product, fp16 weights widened as they are read.
#include "cpu/tiles.h"

#if defined(__x86_64__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's _mm512_undefined_ps initialises itself from itself, which
// -Wuninitialized reports at every unpack and conversion.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

constexpr int kRows = 6;
constexpr int kCols = 64;

__mmask16 first16(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
__mmask32 first32(int64_t n) { return n >= 32 ? 0xffffffffu : (1u << n) - 1; }

// One k step of each kind of A and weight row: `step` elements as a vector
// (the last step of a row masked to its n valid elements, zeros after), and
// acc + a * w lane by lane.
struct F32 {
  using A = float;
  using W = float;
  static constexpr int kStep = 16;
  static __m512 load_a(const float* p, int64_t n) {
    return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first16(n), p);
  }
  static __m512 load_w(const float* p, int64_t n) { return load_a(p, n); }
  static __m512 madd(__m512 acc, __m512 a, __m512 w) { return _mm512_fmadd_ps(a, w, acc); }
};

// bf16 rows by pairs: lane l sums the pairs (2l, 2l + 1) of every 32 elements.
struct BF16 {
  using A = uint16_t;
  using W = uint16_t;
  static constexpr int kStep = 32;
  static __m512 load_a(const uint16_t* p, int64_t n) {
    return n >= 32 ? _mm512_loadu_ps(p) : _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(first32(n), p));
  }
  static __m512 load_w(const uint16_t* p, int64_t n) { return load_a(p, n); }
  static __m512 madd(__m512 acc, __m512 a, __m512 w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w);
  }
};

// fp16 weights against A rows widened to fp32.
struct F16 {
  using A = float;
  using W = uint16_t;
  static constexpr int kStep = 16;
  static __m512 load_a(const float* p, int64_t n) { return F32::load_a(p, n); }
  static __m512 load_w(const uint16_t* p, int64_t n) {
    return _mm512_cvtph_ps(n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                   : _mm256_maskz_loadu_epi16(first16(n), p));
  }
  static __m512 madd(__m512 acc, __m512 a, __m512 w) { return _mm512_fmadd_ps(a, w, acc); }
};

// out[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once. Every output
// goes through the same tree (lanes l and l + 8, then l and l + 4, ...),
// whichever v[i] it is in.
inline __attribute__((always_inline)) __m512 reduce16(const __m512 v[16]) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)  // v[2i] in the low 256 bits, v[2i + 1] in the high
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit lane q: output 4i + q
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i) {  // lane q: outputs 8i + q (2 partials), 8i + 4 + q (2)
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Lane q: outputs q, 4 + q, 8 + q, 12 + q; then in order.
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xdd));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// Bytes ahead that each weight row is prefetched into L1: a block's rows
// are as many streams, and later row tiles read them from L2.
constexpr int64_t kPrefetchBytes = 512;

// c[r * ldc + j] = a[r] . w[j] over k, for r < n_a of R rows and j < m of C
// weight rows. Sums go from the reduced vectors to c by masked stores (a
// float array in between would be read back in pieces of a 64-byte store,
// which the store buffer does not forward).
template <typename S, int R, int C>
void dot_block(const typename S::A* const* a, const typename S::W* const* w, int64_t k, int n_a,
               int m, float* c, int ldc) {
  static_assert(R * C <= 16 || (R * C <= 32 && 16 % C == 0), "a row's sums in one reduce16");
  __m512 acc[R * C];
#pragma GCC unroll 32
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  auto step = [&](int64_t i, int64_t n) {
    __m512 av[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) av[r] = S::load_a(a[r] + i, n);
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + i) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 wv = S::load_w(w[j] + i, n);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r * C + j] = S::madd(acc[r * C + j], av[r], wv);
    }
  };
  int64_t i = 0;
  for (; i + S::kStep <= k; i += S::kStep) step(i, S::kStep);
  if (i < k) step(i, k - i);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 valid = first16(m);
  for (int q = 0; q < R * C; q += 16) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) v[j] = q + j < R * C ? acc[q + j] : _mm512_setzero_ps();
    const __m512 sums = reduce16(v);  // lane l: row (q + l) / C, column (q + l) % C
    for (int r = q / C; r < n_a && r * C < q + 16; ++r) {
      const __m512i from = _mm512_add_epi32(lanes, _mm512_set1_epi32(r * C - q));
      _mm512_mask_storeu_ps(c + r * ldc, valid, _mm512_permutexvar_ps(from, sums));
    }
  }
}

// c[r * ldc + j] for n_a <= R rows and n_w weight rows, C at a time; short
// blocks repeat their last row (same sums, not stored).
template <typename S, int R, int C>
void dot_rows(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k, float* c,
              int ldc) {
  const typename S::A* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = static_cast<const typename S::A*>(a[r < n_a ? r : n_a - 1]);
  for (int j0 = 0; j0 < n_w; j0 += C) {
    const int m = n_w - j0 < C ? n_w - j0 : C;
    const typename S::W* wr[C];
    for (int j = 0; j < C; ++j) wr[j] = static_cast<const typename S::W*>(w[j0 + (j < m ? j : m - 1)]);
    dot_block<S, R, C>(ar, wr, k, n_a, m, c + j0, ldc);
  }
}

template <typename S>
void dot(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k, float* c, int ldc) {
  switch (n_a) {
    case 1: return dot_rows<S, 1, 16>(a, n_a, w, n_w, k, c, ldc);
    case 2: return dot_rows<S, 2, 8>(a, n_a, w, n_w, k, c, ldc);
    case 3: return dot_rows<S, 3, 5>(a, n_a, w, n_w, k, c, ldc);
    case 4: return dot_rows<S, 4, 4>(a, n_a, w, n_w, k, c, ldc);
    default: return dot_rows<S, 6, 4>(a, n_a, w, n_w, k, c, ldc);  // 5 rows: the last repeated
  }
}
static_assert(kRows == 6, "dot covers 1..6 rows");

const TileKernels kTiles = {
    "avx512", kRows, kCols, {dot<F32>, dot<BF16>, dot<F16>}, {kF32, kBF16, kF32}, &kEpilogues,
};

}  // namespace

const TileKernels* avx512_tiles() { return &kTiles; }

}  // namespace fused_moe::cpu

#else

namespace fused_moe::cpu {
const TileKernels* avx512_tiles() { return nullptr; }
}  // namespace fused_moe::cpu

#endif
