// The sm90a grouped GEMM configurations, listed in one place. Each is one
// instantiation of sm90_kernel.cuh, compiled in its own sm90_<name>.cu (about
// 4.5 GB and a minute of nvcc each, so every entry here costs build time).
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "kernels.h"

namespace fused_moe::cuda::sm90 {

// A compiled configuration; handles bf16 and fp16, with or without bias.
struct Config {
  const char* name;
  // Workspace for num_groups experts: the per-group arrays plus CUTLASS's own.
  size_t (*workspace_bytes)(int num_groups, int sm_count);
  // Requires: bf16/fp16, N and K multiples of 8, a/w/out/bias 16-byte aligned.
  void (*run)(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream);
};

// swap_*: out^T = w[e] a_e^T, the weights on the MMA's M side, for few rows
// per expert (the rows only fill the narrow N side of the tile).
extern const Config swap_64x16x128;
extern const Config swap_128x16x128;
extern const Config swap_128x32x128;
extern const Config swap_128x64x64;
// Plain out = a_e w[e]^T for many rows per expert (ping_*: a few hundred).
extern const Config coop_128x256x64;
extern const Config ping_64x256x64;

inline const Config* const kConfigs[] = {
    &swap_64x16x128,  &swap_128x16x128, &swap_128x32x128,
    &swap_128x64x64,  &coop_128x256x64, &ping_64x256x64,
};

}  // namespace fused_moe::cuda::sm90
