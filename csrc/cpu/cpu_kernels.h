// The CPU kernels, one per op: plain functions over kernel_params.h's structs.
#pragma once

#include "kernel_params.h"

namespace fused_moe::cpu {

void topk(const TopkParams& p);
void permute(const PermuteParams& p);
void grouped_gemm(const GroupedGemmParams& p);
void quantize_fp8(const QuantizeParams& p);
void activation(const ActivationParams& p);
void unpermute(const UnpermuteParams& p);
void fused_experts(const DecodeParams& p);

}  // namespace fused_moe::cpu
