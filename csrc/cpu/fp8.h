// FP8 (e4m3fn) elements on the CPU: conversions, and the dequantization
// through which the CPU's quantized GEMMs (FP8, and 4-bit weights) reach the
// float tile kernels.
#pragma once

#include <array>
#include <cstdint>

#include <torch/headeronly/util/Float8_e4m3fn.h>

#include "kernel_params.h"

namespace fused_moe::cpu {

// v saturated to +-448, rounded to nearest even.
uint8_t fp8_from_float(float v);

inline float fp8_to_float(uint8_t v) {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = c10::detail::fp8e4m3fn_to_fp32_value(uint8_t(i));
    return t;
  }();
  return table[v];
}

// out[r][c] = q[r * ld + c] * s.at(expert, first_row + r, c) for r < rows, c < cols.
void dequantize_rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t cols, const ScaleGrid& s,
                     int64_t expert, int64_t first_row, float* out);

// The same for rows of 4-bit weights, q [rows, cols/2] bytes (ld bytes apart):
// out[r][c] = s.value(expert, first_row + r, c, code of c), rounded to O
// (float, or the 16-bit type of the activations, as the GPU rounds them).
template <typename O>
void dequantize_packed4_rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t cols,
                             const Packed4Scales& s, int64_t expert, int64_t first_row, O* out);

}  // namespace fused_moe::cpu
