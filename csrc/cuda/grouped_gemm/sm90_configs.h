// What the dispatcher knows of an sm90a grouped GEMM configuration. The
// configurations themselves are the rows of configs.cmake; the build lists
// them in the generated sm90_config_list.h (kTable).
#pragma once

#include <cstddef>

#include "cuda/launch.h"
#include "kernel_params.h"

namespace fused_moe::cuda::sm90 {

// The FP8 scale block: 128 columns (K) of a row of a, 128x128 of w.
constexpr int kScaleBlock = 128;

// A compiled configuration; handles bf16 and fp16 outputs, with or without bias.
struct Config {
  const char* name;
  // Its inputs: e4m3 with 128-wide row scales and 128x128 weight blocks, or
  // of the output's type.
  bool fp8_block;
  // Workspace for these shapes: the per-group arrays (and FP8 scales) plus CUTLASS's own.
  size_t (*workspace_bytes)(const GroupedGemmParams& p, int sm_count);
  // Requires: bf16/fp16 out, N and K multiples of 8 (16 for FP8), a/w/out/bias 16-byte aligned.
  void (*run)(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream);
};

// A row of configs.cmake; config is null where this build left it out.
struct Entry {
  const char* name;
  bool fp8_block;
  const Config* config;
};

}  // namespace fused_moe::cuda::sm90
