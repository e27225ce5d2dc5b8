// The float functions of the CPU activations (activation_math.h's math
// policy): exp as a polynomial that the compiler vectorises, where the C
// library's expf is a call per element; tanh from it; erf from the library.
#pragma once

#include <math.h>
#include <cstdint>
#include <cstring>

namespace fused_moe::cpu {
// Unnamed: each file, the instruction-set ones (cpu/tiles.h) among them,
// keeps its own copy.
namespace {

struct CpuMath {
  // Within about 2 ulp of expf on [-87, 88]; clamped outside, where expf
  // leaves float's normal range (the activations only see 0 or 1 there).
  static float exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts.
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + kRound) - kRound;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    // Minimax polynomial of exp on |r| <= ln 2 / 2.
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    const float e_r = q * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return e_r * two_n;
  }
  static float tanh(float x) { return 1.0f - 2.0f / (exp(2.0f * x) + 1.0f); }
  static float erf(float x) { return erff(x); }
};

}  // namespace
}  // namespace fused_moe::cpu
