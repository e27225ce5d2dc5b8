// The grouped GEMM dispatcher: an sm90a CUTLASS configuration where one
// applies (Hopper, bf16/fp16 out, N and K multiples of 8, 16-byte aligned;
// FP8 with 128-wide row scales and 128x128 weight blocks, or with a scaled per
// row or per tensor and w per channel or per expert), else the portable
// fallback kernel. 4-bit weights (mxfp4, int4) always take the fallback: no
// sm90 configuration reads them.
//
// FUSED_MOE_GEMM_CONFIG=<name> forces a configuration: "fallback" or a built
// row of configs.cmake (tests and benchmarks use it). It is read on every call
// (getenv is cheap) so it can change at run time. A forced sm90 configuration
// runs the calls of its input kind (16-bit, FP8 block or FP8 row/col scales)
// where the sm90 path applies, the fallback where it does not; the other kinds
// keep their heuristics (4-bit weights: the fallback).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm/sm90_config_list.h"  // generated: kTable
#include "cuda/grouped_gemm/sm90_configs.h"

namespace fused_moe::cuda {

// sm80_fallback.cu: any dtype, shape and alignment, on any arch >= sm_80.
void grouped_gemm_fallback(const GroupedGemmParams& p, cudaStream_t stream);

namespace {

// The forced configuration's name, or null.
const char* forced_config() {
  const char* name = std::getenv("FUSED_MOE_GEMM_CONFIG");
  return name && *name ? name : nullptr;
}

bool is_fallback(const char* name) { return std::strcmp(name, "fallback") == 0; }

// sm_90a code runs on compute capability 9.0 only.
bool is_sm90(const DeviceInfo& d) { return d.major == 9 && d.minor == 0; }

// The scales the FP8 block configurations read: a per row per 128 columns,
// w per 128x128 block, dense.
bool fp8_block_scales(const GroupedGemmParams& p) {
  const ScaleGrid &a = p.a_scale, &w = p.w_scale;
  const int64_t kb = ceil_div(p.k, sm90::kScaleBlock), nb = ceil_div(p.n, sm90::kScaleBlock);
  return a.rows_per == 1 && a.cols_per == sm90::kScaleBlock && a.row_stride == kb &&
         w.rows_per == sm90::kScaleBlock && w.cols_per == sm90::kScaleBlock &&
         w.row_stride == kb && w.expert_stride == nb * kb;
}

// The scales the FP8 row/col configurations read: a per row or one for all
// rows, w per output channel or one per expert.
bool fp8_rowcol_scales(const GroupedGemmParams& p) {
  return sm90::row_scales_of(p.a_scale, p.rows, p.k) != sm90::RowScales::kOther &&
         sm90::row_scales_of(p.w_scale, p.n, p.k) != sm90::RowScales::kOther;
}

// The sm90 input kind of the call; none for 4-bit weights and for FP8 scales
// that no sm90 kind takes.
std::optional<sm90::Inputs> inputs_of(const GroupedGemmParams& p) {
  if (p.w4.kind != Packed4::kNone) return std::nullopt;
  if (!p.fp8) return sm90::Inputs::k16bit;
  if (fp8_block_scales(p)) return sm90::Inputs::kFp8Block;
  if (fp8_rowcol_scales(p)) return sm90::Inputs::kFp8RowCol;
  return std::nullopt;
}

// What the sm90 kernels need: TMA wants 16-byte aligned bases and rows (the
// strides too, so every expert's base is aligned): 8 elements of 2 bytes, 16
// of FP8.
bool sm90_applies(const GroupedGemmParams& p, const DeviceInfo& d) {
  const int64_t in = p.fp8 ? 16 : 8;
  return is_sm90(d) && p.w4.kind == Packed4::kNone &&
         (p.dtype == ScalarType::BFloat16 || p.dtype == ScalarType::Half) &&
         inputs_of(p) && p.num_experts > 0 && p.k > 0 && p.n % 8 == 0 &&
         p.k % in == 0 && p.n <= INT32_MAX && p.k <= INT32_MAX && aligned16(p.a) &&
         aligned16(p.w) && aligned16(p.out) && (p.bias == nullptr || aligned16(p.bias)) &&
         p.a_stride % in == 0 && p.w_expert_stride % in == 0 && p.w_row_stride % in == 0;
}

// From the average rows per expert, tuned on an H200 with
// benchmarks/bench_gemm.py over the PERF.md shapes (benchmarks/RESULTS.md,
// "GEMM tile heuristic"): the swap-AB tile whose narrow side holds a typical
// expert's rows (mean + ~3 sigma of a Poisson count) reads each weight once.
// Past ~48 rows the 256-wide tiles win: 64 rows deep up to a few hundred
// rows, where a 128-row tile would pad each expert's last tile by half a tile
// on average, then 128 rows deep, which reads each weight tile from L2 half
// as often. The 64-row tile lost wherever N is not a multiple of 256
// (gpt-oss-120b), so it is not used there.
const char* heuristic(const GroupedGemmParams& p, const DeviceInfo& d) {
  const double rows_per_expert = double(p.rows) / p.num_experts;
  if (rows_per_expert <= 10) {
    const int64_t experts_used = std::min<int64_t>(p.rows, p.num_experts);
    const bool few_tiles = experts_used * ((p.n + 127) / 128) < d.sm_count;
    return few_tiles ? "swap_64x16x128" : "swap_128x16x128";
  }
  if (rows_per_expert <= 24) return "swap_128x32x128";
  if (rows_per_expert <= 48) return "swap_128x64x64";
  // Few experts (mixtral-like: a few big ones): the 64-row tile also won the
  // whole layer at 512 rows per expert, not at 2048 (benchmarks/RESULTS.md,
  // "GEMM tile heuristic").
  const double ping_rows = p.num_experts <= 16 ? 1024 : 320;
  if (rows_per_expert <= ping_rows && p.n % 256 == 0) return "ping_64x256x64";
  return "coop_128x256x64";
}

// FP8 block: the same bands of rows per expert, on K tiles of 128.
const char* heuristic_fp8(const GroupedGemmParams& p) {
  const double rows_per_expert = double(p.rows) / p.num_experts;
  if (rows_per_expert <= 10) return "fp8_swap_128x16x128";
  if (rows_per_expert <= 24) return "fp8_swap_128x32x128";
  if (rows_per_expert <= 48) return "fp8_swap_128x64x128";
  if (rows_per_expert <= (p.num_experts <= 16 ? 1024 : 320)) return "fp8_ping_64x128x128";
  return "fp8_coop_128x128x128";
}

// FP8 row/col scales: heuristic_fp8's bands on three tiles. The 32-row
// swap-AB tile takes both decode bands (up to ~24 rows per expert on average,
// mostly one tile of rows), the 64-row tile the middle ones, 128 rows beyond.
const char* heuristic_rowcol(const GroupedGemmParams& p) {
  const double rows_per_expert = double(p.rows) / p.num_experts;
  if (rows_per_expert <= 24) return "rowcol_swap_128x32x128";
  if (rows_per_expert <= (p.num_experts <= 16 ? 1024 : 320)) return "rowcol_ping_64x256x128";
  return "rowcol_coop_128x256x128";
}

const char* heuristic_of(sm90::Inputs kind, const GroupedGemmParams& p, const DeviceInfo& d) {
  switch (kind) {
    case sm90::Inputs::kFp8Block: return heuristic_fp8(p);
    case sm90::Inputs::kFp8RowCol: return heuristic_rowcol(p);
    default: return heuristic(p, d);
  }
}

// The built row of the same input kind nearest to `name` in configs.cmake's
// order (rows per expert), the larger tile on a tie; null when this build has
// none of that kind.
const sm90::Config* nearest_built(const char* name) {
  const int n = static_cast<int>(sm90::kTable.size());
  int at = 0;
  while (at < n && std::strcmp(sm90::kTable[at].name, name) != 0) ++at;
  if (at == n) return nullptr;
  const sm90::Inputs kind = sm90::kTable[at].inputs;
  auto built = [&](int i) {
    return i >= 0 && i < n && sm90::kTable[i].inputs == kind && sm90::kTable[i].config;
  };
  for (int step = 0; step < n; ++step) {
    if (built(at + step)) return sm90::kTable[at + step].config;
    if (built(at - step)) return sm90::kTable[at - step].config;
  }
  return nullptr;
}

// The forced configuration, or null when none is forced or it is "fallback".
const sm90::Config* forced_sm90(const char* forced) {
  if (!forced || is_fallback(forced)) return nullptr;
  std::string names = "fallback";
  for (const sm90::Entry& e : sm90::kTable) {
    if (!e.config) continue;
    if (std::strcmp(e.name, forced) == 0) return e.config;
    names += std::string(", ") + e.name;
  }
  throw std::runtime_error(std::string("FUSED_MOE_GEMM_CONFIG=") + forced +
                           " is not a configuration of this build: " + names);
}

// The sm90 configuration to run, or null for the fallback.
const sm90::Config* choose(const GroupedGemmParams& p, const DeviceInfo& d) {
  const char* forced = forced_config();
  if (forced && is_fallback(forced)) return nullptr;
  const sm90::Config* named = forced_sm90(forced);
  if (!sm90_applies(p, d)) return nullptr;
  const sm90::Inputs kind = *inputs_of(p);
  if (named && named->inputs == kind) return named;
  return nearest_built(heuristic_of(kind, p, d));
}

// The largest over the built configurations of the call's input kind, so
// that the size does not hinge on which one grouped_gemm picks.
size_t sm90_workspace_bytes(const GroupedGemmParams& p, sm90::Inputs kind, int sm_count) {
  size_t bytes = 0;
  for (const sm90::Entry& e : sm90::kTable) {
    if (e.config && e.inputs == kind)
      bytes = std::max(bytes, e.config->workspace_bytes(p, sm_count));
  }
  return bytes;
}

}  // namespace

size_t grouped_gemm_workspace_bytes(const GroupedGemmParams& p) {
  if (p.rows == 0 || p.n == 0) return 0;
  const DeviceInfo& d = device_info();
  const sm90::Config* config = choose(p, d);
  return config ? sm90_workspace_bytes(p, config->inputs, d.sm_count) : 0;  // fallback: none
}

void grouped_gemm(const GroupedGemmParams& p, void* workspace, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return;
  const DeviceInfo& d = device_info();
  if (const sm90::Config* config = choose(p, d)) return config->run(p, workspace, d.sm_count, stream);
  grouped_gemm_fallback(p, stream);
}

}  // namespace fused_moe::cuda
