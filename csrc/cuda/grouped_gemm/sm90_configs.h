// What the dispatcher knows of an sm90a grouped GEMM configuration. The
// configurations themselves are the rows of configs.cmake; the build lists
// them in the generated sm90_config_list.h (kTable).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/launch.h"
#include "kernel_params.h"

namespace fused_moe::cuda::sm90 {

// The FP8 scale block: 128 columns (K) of a row of a, 128x128 of w.
constexpr int kScaleBlock = 128;

// What a configuration multiplies (the `inputs` column of configs.cmake): a
// and w of the output's type; e4m3 with block scales (applied in the
// mainloop); or e4m3 with row/col scales (applied in the epilogue: a per row
// or per tensor, w per output channel or per expert).
enum class Inputs { k16bit, kFp8Block, kFp8RowCol };

// How the fp8_rowcol configurations read the scales of a [rows, cols] matrix
// (a, or each expert's w): one scale for all of it, a vector of one per row,
// or neither (then those configurations do not apply).
enum class RowScales { kOne, kPerRow, kOther };

inline RowScales row_scales_of(const ScaleGrid& s, int64_t rows, int64_t cols) {
  if (s.cols_per < cols) return RowScales::kOther;
  if (s.rows_per >= rows) return RowScales::kOne;
  return s.rows_per == 1 && s.row_stride == 1 ? RowScales::kPerRow : RowScales::kOther;
}

// A compiled configuration; handles bf16 and fp16 outputs, with or without bias.
struct Config {
  const char* name;
  Inputs inputs;
  // Workspace for these shapes: the per-group arrays (and FP8 scales) plus CUTLASS's own.
  size_t (*workspace_bytes)(const GroupedGemmParams& p, int sm_count);
  // Requires: bf16/fp16 out, N and K multiples of 8 (16 for FP8), a/w/out/bias 16-byte aligned.
  void (*run)(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream);
};

// A row of configs.cmake; config is null where this build left it out.
struct Entry {
  const char* name;
  Inputs inputs;
  const Config* config;
};

}  // namespace fused_moe::cuda::sm90
