// FP8 (e4m3fn) quantization of rows on the CPU, and the dequantization the
// CPU's quantized GEMMs read through (cpu/fp8.h): FP8 rows, 4-bit weights.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/fp8.h"
#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

float scale_of(float amax) { return std::max(amax, kScaleEps) / kFp8Max; }

template <typename T>
float amax_of(const T* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

template <typename T>
void quantize_run(const T* x, int64_t n, float scale, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8_from_float(static_cast<float>(x[i]) / scale);
}

template <typename T>
const T* row_of(const QuantizeParams& p, int64_t r) {
  return static_cast<const T*>(p.x) + r * p.x_stride;
}

// One scale for every row: the amax of each thread's rows, then their max
// (order-free, so the same bits on any thread count).
template <typename T>
float tensor_scale(const QuantizeParams& p) {
  if (p.static_scale) return *p.static_scale;
  std::vector<float> part(std::max<int64_t>(p.rows, 1), 0.0f);
  parallel_rows(p.rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) part[r] = amax_of(row_of<T>(p, r), p.cols);
  });
  return scale_of(*std::max_element(part.begin(), part.end()));
}

}  // namespace

uint8_t fp8_from_float(float v) {
  return c10::detail::fp8e4m3fn_from_fp32_value(std::clamp(v, -kFp8Max, kFp8Max));
}

void quantize_fp8(const QuantizeParams& p) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool one_scale = p.per_tensor || p.static_scale;
    const float shared = one_scale ? tensor_scale<T>(p) : 0.0f;
    if (one_scale) p.scales[0] = shared;
    const int64_t groups = (p.cols + p.group - 1) / p.group;
    parallel_rows(p.rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* x = row_of<T>(p, r);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t c0 = g * p.group, n = std::min(p.group, p.cols - c0);
          const float s = one_scale ? shared : scale_of(amax_of(x + c0, n));
          if (!one_scale) p.scales[r * groups + g] = s;
          quantize_run(x + c0, n, s, p.q + r * p.cols + c0);
        }
      }
    });
  });
}

void dequantize_rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t cols, const ScaleGrid& s,
                     int64_t expert, int64_t first_row, float* out) {
  const auto decode = tile_kernels().decode_fp8;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = q + r * ld;
    float* dst = out + r * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += s.cols_per) {
      const float scale = s.at(expert, first_row + r, c0);
      const int64_t end = std::min(cols, c0 + s.cols_per);
      if (decode) {
        decode(row + c0, end - c0, scale, dst + c0);
      } else {
        for (int64_t c = c0; c < end; ++c) dst[c] = fp8_to_float(row[c]) * scale;
      }
    }
  }
}

namespace {

// Rows through the tile table's decode4 (16-bit O, groups of whole 32-code
// vectors): the group scales and zero points of a row gathered first.
template <typename O>
bool decode4_rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t cols,
                  const Packed4Scales& s, int64_t expert, int64_t first_row, O* out) {
  if constexpr (std::is_same_v<O, float>) {
    return false;
  } else {
    const auto decode = tile_kernels().decode4[elem_of<O>()];
    if (!decode || s.group % 32 != 0 || cols % s.group != 0) return false;
    const bool mx = s.kind == Packed4::kMxfp4;
    float base[16];
    for (int code = 0; code < 16; ++code) base[code] = mx ? s.code_value(code, 1.0f, 0) : float(code);
    const int64_t groups = cols / s.group;
    std::vector<float> scales(groups), zeros(groups);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        scales[g] = s.scale_of_group(expert, first_row + r, g);
        zeros[g] = mx ? 0.0f : float(s.zero_of_group(expert, first_row + r, g));
      }
      decode(q + r * ld, groups, s.group, base, scales.data(), zeros.data(), out + r * cols);
    }
    return true;
  }
}

}  // namespace

template <typename O>
void dequantize_packed4_rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t cols,
                             const Packed4Scales& s, int64_t expert, int64_t first_row, O* out) {
  if (decode4_rows(q, ld, rows, cols, s, expert, first_row, out)) return;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = q + r * ld;
    O* dst = out + r * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += s.group) {
      // A group shares its scale and zero point: read them once, then the 16 values of its codes.
      const int64_t g = c0 / s.group;
      const float scale = s.scale_of_group(expert, first_row + r, g);
      const int zero = s.zero_of_group(expert, first_row + r, g);
      O values[16];
      for (int code = 0; code < 16; ++code) values[code] = O(s.code_value(code, scale, zero));
      const int64_t end = std::min(cols, c0 + s.group);
      for (int64_t c = c0; c < end; c += 2) {
        const uint8_t byte = row[c / 2];
        dst[c] = values[byte & 0xF];
        dst[c + 1] = values[byte >> 4];
      }
    }
  }
}

template void dequantize_packed4_rows<float>(const uint8_t*, int64_t, int64_t, int64_t,
                                            const Packed4Scales&, int64_t, int64_t, float*);
template void dequantize_packed4_rows<BFloat16>(const uint8_t*, int64_t, int64_t, int64_t,
                                               const Packed4Scales&, int64_t, int64_t, BFloat16*);
template void dequantize_packed4_rows<Half>(const uint8_t*, int64_t, int64_t, int64_t,
                                           const Packed4Scales&, int64_t, int64_t, Half*);

}  // namespace fused_moe::cpu
