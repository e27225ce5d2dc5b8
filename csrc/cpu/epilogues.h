// The tile epilogues of cpu/tiles.h, written once and compiled into each file
// that defines a table of tile kernels, at that file's vector width. All of
// it is in an unnamed namespace, so each file keeps its own copy.
#pragma once

#include <cstdint>
#include <cstring>

#include "activation_math.h"
#include "cpu/cpu_math.h"
#include "cpu/tiles.h"

#if defined(__F16C__)
#include <immintrin.h>
#else
#include <torch/headeronly/util/Half.h>
#endif

namespace fused_moe::cpu {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// fp16 through F16C where the file has it; else torch's conversion (files
// without F16C are built for the baseline instruction set, so sharing
// torch's inline function with them is safe).
#if defined(__F16C__)
float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
uint16_t float_to_half(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
#else
float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
uint16_t float_to_half(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
#endif

// Round to nearest even, NaN to the quiet NaN 0x7fc0: torch's BFloat16(float).
uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

template <Elem E>
float load(const void* p, int64_t i) {
  if constexpr (E == kF32) {
    return static_cast<const float*>(p)[i];
  } else {
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    if constexpr (E == kBF16) return from_bits(uint32_t(h) << 16);
    else return half_to_float(h);
  }
}

template <Elem E>
void store(void* p, int64_t i, float x) {
  if constexpr (E == kF32) static_cast<float*>(p)[i] = x;
  else if constexpr (E == kBF16) static_cast<uint16_t*>(p)[i] = float_to_bf16(x);
  else static_cast<uint16_t*>(p)[i] = float_to_half(x);
}

// x as the element type stores it.
template <Elem E>
float rounded(float x) {
  if constexpr (E == kF32) return x;
  else if constexpr (E == kBF16) return from_bits(uint32_t(float_to_bf16(x)) << 16);
  else return half_to_float(float_to_half(x));
}

template <Elem E, Activation A>
void activate_rows(const ActRows& a) {
  for (int r = 0; r < a.rows; ++r) {
    const float* gate = a.gate + r * a.ld;
    const int64_t o = r * a.ld_out;
    if (a.up == nullptr) {
      for (int j = 0; j < a.n; ++j)
        store<E>(a.out, o + j, act<A, CpuMath>(rounded<E>(gate[j] + a.bias_gate[j])));
      continue;
    }
    const float* up = a.up + r * a.ld;
    for (int j = 0; j < a.n; ++j)
      store<E>(a.out, o + j, gated_act<A, CpuMath>(rounded<E>(gate[j] + a.bias_gate[j]),
                                                   rounded<E>(up[j] + a.bias_up[j])));
  }
}

template <Elem E>
void store_rows(const float* sums, int ld, int rows, int n, const float* bias, void* out,
                int64_t ld_out) {
  for (int r = 0; r < rows; ++r) {
    const float* s = sums + r * ld;
    if (bias) {
      for (int j = 0; j < n; ++j) store<E>(out, r * ld_out + j, s[j] + bias[j]);
    } else {
      for (int j = 0; j < n; ++j) store<E>(out, r * ld_out + j, s[j]);
    }
  }
}

template <Elem E>
void accumulate(float* acc, const void* y, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * load<E>(y, i);
}

static_assert(int(Activation::kSilu) == 0 && int(Activation::kGelu) == 1 &&
                  int(Activation::kGeluTanh) == 2 && int(Activation::kRelu2) == 3 &&
                  int(Activation::kSwigluOai) == 4 && kNumActivations == 5,
              "kEpilogues.activate lists the activations in enum order");

const Epilogues kEpilogues = {
    {
     {activate_rows<kF32, Activation::kSilu>,
      activate_rows<kF32, Activation::kGelu>,
      activate_rows<kF32, Activation::kGeluTanh>,
      activate_rows<kF32, Activation::kRelu2>,
      activate_rows<kF32, Activation::kSwigluOai>},
     {activate_rows<kBF16, Activation::kSilu>,
      activate_rows<kBF16, Activation::kGelu>,
      activate_rows<kBF16, Activation::kGeluTanh>,
      activate_rows<kBF16, Activation::kRelu2>,
      activate_rows<kBF16, Activation::kSwigluOai>},
     {activate_rows<kF16, Activation::kSilu>,
      activate_rows<kF16, Activation::kGelu>,
      activate_rows<kF16, Activation::kGeluTanh>,
      activate_rows<kF16, Activation::kRelu2>,
      activate_rows<kF16, Activation::kSwigluOai>}},
    {store_rows<kF32>, store_rows<kBF16>, store_rows<kF16>},
    {accumulate<kF32>, accumulate<kBF16>, accumulate<kF16>},
};

}  // namespace
}  // namespace fused_moe::cpu
