// What the dispatcher knows of an sm90a grouped GEMM configuration. The
// configurations themselves are the rows of configs.cmake; the build lists
// them in the generated sm90_config_list.h (kTable).
#pragma once

#include <cstddef>

#include "cuda/launch.h"
#include "kernel_params.h"

namespace fused_moe::cuda::sm90 {

// A compiled configuration; handles bf16 and fp16, with or without bias.
struct Config {
  const char* name;
  // Workspace for num_groups experts: the per-group arrays plus CUTLASS's own.
  size_t (*workspace_bytes)(int num_groups, int sm_count);
  // Requires: bf16/fp16, N and K multiples of 8, a/w/out/bias 16-byte aligned.
  void (*run)(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream);
};

// A row of configs.cmake; config is null where this build left it out.
struct Entry {
  const char* name;
  const Config* config;
};

}  // namespace fused_moe::cuda::sm90
