// Element types of the CPU kernels: every kernel loads to float, computes in
// float and rounds once on store.
#pragma once

#include <stdexcept>
#include <string>

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "cpu/cpu_kernels.h"

namespace fused_moe::cpu {

using BFloat16 = torch::headeronly::BFloat16;
using Half = torch::headeronly::Half;

// Calls f(T{}) with T the C++ type of `dtype` (float, bf16, fp16, and double
// when allow_double).
template <typename F>
void dispatch_float(ScalarType dtype, F&& f, bool allow_double = false) {
  switch (dtype) {
    case ScalarType::Float: f(float{}); return;
    case ScalarType::BFloat16: f(BFloat16{}); return;
    case ScalarType::Half: f(Half{}); return;
    case ScalarType::Double:
      if (allow_double) { f(double{}); return; }
      break;
    default: break;
  }
  throw std::runtime_error(std::string("fused_moe: unsupported dtype ") +
                           torch::headeronly::toString(dtype));
}

// The local slots of p.topk_ids sorted by expert, slot order kept within an
// expert: fills p.expert_offsets and p.inv_index (permute's first half).
void sort_slots(const PermuteParams& p);

// Runs f(begin, end) over [0, n) on torch's intra-op thread pool.
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n > 0) torch::stable::parallel_for(0, n, grain, f);
}

}  // namespace fused_moe::cpu
