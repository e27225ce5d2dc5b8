// Tile kernels for AVX-512 (F, BW, VL, DQ and BF16; CMakeLists.txt compiles
// this file with those instructions): fp32 multiply-adds, bf16 by its
// pairwise dot product, fp16 weights widened as they are read; few rows as
// 16-lane dot products over weight rows read in place, many rows against a
// packed panel of the weights.
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

// --- Packed weights, for tasks of many rows ---------------------------------
// A task with many rows packs its weight rows once into a panel of 32-bit
// units (a bf16 pair or a float), unit u of every row side by side:
// panel[u * kCols + j]. A tile then broadcasts each unit of its A rows
// against the kCols / 16 weight vectors of that unit: each weight load
// serves every row of the tile and no sum needs reducing across lanes, which
// at a K of a few hundred costs as much as the products. An output is summed
// unit by unit in k order, so its bits depend on its row of A, its weight
// row and K alone here too (not on the task's other rows).
constexpr int kPackRows = 16;  // rows from which a task packs (cpu/tiles.h)

// t[j] = column j of the 16 x 16 matrix of 32-bit units whose row i is t[i]:
// pairs of rows interleaved, then pairs of pairs, then 128-bit lanes in two
// rounds.
inline __attribute__((always_inline)) void transpose16(__m512i t[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
  }
  // b[4i + c], 128-bit lane l: column 4l + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i d0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88);  // lanes 0, 2 of each
    const __m512i d1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xdd);  // lanes 1, 3
    const __m512i d2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88);
    const __m512i d3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(d0, d2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(d1, d3, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(d0, d2, 0xdd);
    t[12 + c] = _mm512_shuffle_i32x4(d1, d3, 0xdd);
  }
}

// The panel of n_w <= kCols weight rows of k elements of kSize bytes; zero
// units past a row's end (half of the last bf16 pair of an odd k) and past n_w.
constexpr int64_t kPackAhead = 1024;  // bytes ahead that pack prefetches each row

template <int kSize>
void pack(const void* const* w, int n_w, int64_t k, void* panel) {
  const int64_t bytes = k * kSize, units = (bytes + 3) / 4;
  uint32_t* out = static_cast<uint32_t*>(panel);
  for (int g = 0; g < kCols; g += 16) {
    for (int64_t u0 = 0; u0 < units; u0 += 16) {
      const int64_t left = bytes - 4 * u0;
      const __mmask64 mask = left >= 64 ? ~0ull : (1ull << left) - 1;
      __m512i t[16];
      for (int i = 0; i < 16; ++i) {
        // Sixteen rows are as many streams from memory, more than the
        // hardware prefetchers follow.
        if (g + i < n_w) _mm_prefetch(static_cast<const char*>(w[g + i]) + 4 * u0 + kPackAhead, _MM_HINT_T0);
        t[i] = g + i < n_w ? _mm512_maskz_loadu_epi8(mask, static_cast<const char*>(w[g + i]) + 4 * u0)
                           : _mm512_setzero_si512();
      }
      transpose16(t);
      const int64_t n = units - u0 < 16 ? units - u0 : 16;
      for (int64_t i = 0; i < n; ++i) _mm512_storeu_si512(out + (u0 + i) * kCols + g, t[i]);
    }
  }
}

// Unit u of an A row, in every lane; `last`: the lone element of an odd
// bf16 row's last pair (its partner is not there to read).
__m512 broadcast(const float* a, int64_t u, bool) { return _mm512_set1_ps(a[u]); }
__m512 broadcast(const uint16_t* a, int64_t u, bool last) {
  uint32_t v = a[2 * u];
  if (!last) std::memcpy(&v, a + 2 * u, sizeof(v));
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(v)));
}

// c[r * ldc + j] = a[r] . panel column j, for R rows and every j < kCols.
template <typename S, int R>
void packed_block(const typename S::A* const* a, const uint32_t* panel, int64_t k, float* c, int ldc,
                  Prefetch& ahead) {
  constexpr int V = kCols / 16;
  constexpr int kPer = 4 / sizeof(typename S::A);  // elements a unit
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  int row = ahead.row;
  int64_t at = ahead.at;
  auto step = [&](int64_t u, bool last) {
    if (row < ahead.n) {
      _mm_prefetch(static_cast<const char*>(ahead.rows[row]) + at, _MM_HINT_T1);
      if ((at += 64) >= ahead.bytes) at = 0, ++row;
    }
    __m512 wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(panel + u * kCols + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = broadcast(a[r], u, last);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = S::madd(acc[r][v], av, wv[v]);
    }
  };
  const int64_t whole = k / kPer;
  for (int64_t u = 0; u < whole; ++u) step(u, false);
  if (whole * kPer < k) step(whole, true);
  ahead.row = row;
  ahead.at = at;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <typename S>
void packed_dot(const void* const* a, int n_a, const void* panel, int64_t k, float* c, int ldc,
                Prefetch& ahead) {
  const auto* ar = reinterpret_cast<const typename S::A* const*>(a);
  const auto* p = static_cast<const uint32_t*>(panel);
  switch (n_a) {
    case 1: return packed_block<S, 1>(ar, p, k, c, ldc, ahead);
    case 2: return packed_block<S, 2>(ar, p, k, c, ldc, ahead);
    case 3: return packed_block<S, 3>(ar, p, k, c, ldc, ahead);
    case 4: return packed_block<S, 4>(ar, p, k, c, ldc, ahead);
    case 5: return packed_block<S, 5>(ar, p, k, c, ldc, ahead);
    default: return packed_block<S, 6>(ar, p, k, c, ldc, ahead);
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

// 4-bit codes through a table of 16 elements a group: each 16 bytes (32
// codes) widened to dwords, low nibble in the low word, high nibble in the
// high word, then one word permute of the group's table.
template <bool kBF16>
void decode4(const uint8_t* q, int64_t groups, int64_t group, const float* base,
             const float* scales, const float* zeros, void* out) {
  const __m512 codes = _mm512_loadu_ps(base);
  const __m512i lo = _mm512_set1_epi32(0x0f), hi = _mm512_set1_epi32(0xf0);
  auto* o = static_cast<uint16_t*>(out);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zeros[g])),
                                   _mm512_set1_ps(scales[g]));
    __m256i half;
    if constexpr (kBF16) {
      const __m256bh h = _mm512_cvtneps_pbh(f);
      std::memcpy(&half, &h, sizeof(half));
    } else {
      half = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i table = _mm512_zextsi256_si512(half);
    for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c / 2)));
      const __m512i idx = _mm512_or_si512(_mm512_and_si512(d, lo),
                                          _mm512_slli_epi32(_mm512_and_si512(d, hi), 12));
      _mm512_storeu_si512(o + c, _mm512_permutexvar_epi16(idx, table));
    }
  }
}

// e4m3fn through fp16: its bits shifted into fp16's are the value times
// 2^-8 exactly (subnormals too), then widened and scaled by 256 (exact) and
// the scale; 0x7f and 0xff are e4m3fn's NaN.
void decode_fp8(const uint8_t* q, int64_t n, float scale, float* out) {
  const __m512 by256 = _mm512_set1_ps(256.0f), s = _mm512_set1_ps(scale);
  const __m256i magnitude = _mm256_set1_epi16(0x7f), sign = _mm256_set1_epi16(0x80);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = first16(n - i);
    const __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(in, q + i));
    const __m256i m = _mm256_and_si256(b, magnitude);
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(m, 7),
                                      _mm256_slli_epi16(_mm256_and_si256(b, sign), 8));
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtph_ps(h), by256), s);
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(m, magnitude);
    v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(__builtin_nanf("")));
    _mm512_mask_storeu_ps(out + i, in, v);
  }
}

const TileKernels kTiles = {
    "avx512",
    kRows,
    kCols,
    {dot<F32>, dot<BF16>, dot<F16>},
    {kF32, kBF16, kF32},
    &kEpilogues,
    kPackRows,
    {pack<4>, pack<2>, nullptr},  // fp16 weights keep to dot (they would need widening)
    {packed_dot<F32>, packed_dot<BF16>, nullptr},
    {nullptr, decode4<true>, decode4<false>},
    decode_fp8,
};

}  // namespace

const TileKernels* avx512_tiles() { return &kTiles; }

}  // namespace fused_moe::cpu

#else

namespace fused_moe::cpu {
const TileKernels* avx512_tiles() { return nullptr; }
}  // namespace fused_moe::cpu

#endif
