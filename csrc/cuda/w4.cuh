// 4-bit weights decoded in registers to the 16-bit type of the MMA, for the
// kernels that stream packed weights (grouped_gemm/w4_mma.cu).
//
// A 32-bit word holds codes c0..c7 (bytes in order, the even k in the low
// nibble). pair(w, w >> 4, i), i = 0..3, is the T pair (c_2i, c_2i+1) of
// byte i: the two columns a 32-bit word of activations holds, so kernels
// multiply by activations as they lie in memory. The scales come per pair as
// T2 factors:
//   int4:  (c - z) * s: the codes as 128 + c (bf16) or 1024 + c (fp16),
//          exact; minus 128 + z (exact) times s;
//   mxfp4: the e2m1 code as the bf16 e2m1 * 2^-126 (its three magnitude bits
//          in the exponent's low bits and the mantissa's top bit: 0.5 is the
//          subnormal 2^-127), times 2^(s - 1) = 2^126 * 2^(s - 127); past
//          s = 128 that factor overflows, so a second one, 2^(s - 128),
//          follows (or NaN for s = 255). Powers of two: every product exact
//          where bf16 holds it.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace fused_moe::cuda::w4 {

template <typename T>
struct Traits;
template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128 in both halves
};
template <>
struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024 in both halves
};

template <typename T>
__device__ __forceinline__ typename Traits<T>::T2 as_t2(uint32_t bits) {
  typename Traits<T>::T2 v;
  memcpy(&v, &bits, 4);
  return v;
}
template <typename T>
__device__ __forceinline__ uint32_t bits_of(typename Traits<T>::T2 v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return bits;
}

// Byte i of w in bits 0..7 and byte i of w >> 4 in bits 16..23: the codes
// c_2i, c_2i+1 in bits 0..3 and 16..19 (the other bits are never read).
__device__ __forceinline__ uint32_t spread(uint32_t w, uint32_t w4, int i) {
  return __byte_perm(w, w4, i | (4 + i) << 8);
}

// The T pair (128 + c, 128 + c') (1024 + .. for fp16) of spread v.
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t v) {
  return (v & 0x000F000Fu) | Traits<T>::kMagic;
}

// The bf16 pair (e2m1(c), e2m1(c')) * 2^-126 of spread v.
__device__ __forceinline__ uint32_t e2m1_pair(uint32_t v) {
  return ((v << 6) & 0x01C001C0u) | ((v << 12) & 0x80008000u);
}

// What a group's pairs are scaled by: int4 (c - z) * s as (pair - zero) *
// scale; mxfp4 pair * scale (* second when `twice`).
template <typename T>
struct Factors {
  uint32_t scale, second;  // T2 bits; second: int4's 128 + z, mxfp4's second factor
  bool twice;
};

template <typename T>
__device__ __forceinline__ uint32_t splat(T v) {
  uint16_t b;
  memcpy(&b, &v, 2);
  return uint32_t(b) * 0x00010001u;
}

// mxfp4: group scale byte s (e8m0; bf16 only).
__device__ __forceinline__ Factors<__nv_bfloat16> mx_factors(uint32_t s) {
  const uint32_t first = (min(s, 128u) + 126u) << 7;  // 2^(min(s, 128) - 1)
  const uint32_t second = s == 255u ? 0x7fc0u : (s - 1u) << 7;  // 2^(s - 128)
  return {first * 0x00010001u, second * 0x00010001u, s > 128u};
}

// int4: group scale s (as a float) and zero point z.
template <typename T>
__device__ __forceinline__ Factors<T> int4_factors(float s, uint32_t z) {
  return {splat(from_float<T>(s)), (Traits<T>::kMagic | z * 0x00010001u), false};
}

// The 4 T pairs of word w (codes c0..c7) scaled: out[i] = (c_2i, c_2i+1).
template <typename T, bool kMx>
__device__ __forceinline__ void decode_word(uint32_t w, const Factors<T>& f, uint32_t (&out)[4]) {
  using T2 = typename Traits<T>::T2;
  const T2 scale = as_t2<T>(f.scale), second = as_t2<T>(f.second);
  const uint32_t w4 = w >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = spread(w, w4, i);
    T2 x;
    if constexpr (kMx) {
      x = __hmul2(as_t2<T>(e2m1_pair(v)), scale);
      if (f.twice) x = __hmul2(x, second);
    } else {
      x = __hmul2(__hsub2(as_t2<T>(int4_pair<T>(v)), second), scale);
    }
    out[i] = bits_of<T>(x);
  }
}

// d += a b: the lane's fragments of a 16x16 A and 16x8 B, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

}  // namespace fused_moe::cuda::w4
