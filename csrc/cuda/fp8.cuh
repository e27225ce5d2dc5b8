// The e4m3fn rounding rule of quantize_fp8, shared by every kernel that
// quantizes (quantize.cu, and the FP8 decode kernels that stage their
// inputs the same way): scale = max(amax, eps) / 448, q = saturate(x / scale).
#pragma once

#include <cuda_fp8.h>

#include "kernel_params.h"

namespace fused_moe::cuda {

__device__ __forceinline__ float fp8_scale_of(float amax) {
  return fmaxf(amax, kScaleEps) / kFp8Max;
}

__device__ __forceinline__ uint8_t fp8_quantize(float x, float scale) {
  const float y = fminf(fmaxf(__fdiv_rn(x, scale), -kFp8Max), kFp8Max);
  return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace fused_moe::cuda
