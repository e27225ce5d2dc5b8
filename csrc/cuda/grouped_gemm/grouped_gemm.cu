// The grouped GEMM dispatcher: an sm90a CUTLASS configuration where one
// applies (Hopper, bf16/fp16 out, N and K multiples of 8, 16-byte aligned;
// FP8 with 128-wide row scales and 128x128 weight blocks, or with a scaled per
// row or per tensor and w per channel or per expert), else the portable
// fallback kernel. 4-bit weights (mxfp4, int4) take the tensor-core kernel
// of w4_mma.cu where it applies, else the fallback: no sm90 configuration
// reads them. Past kDequantRows rows per expert on Hopper, they are instead
// dequantized to 16 bits, a few experts at a time into a bounded workspace,
// and multiplied by the sm90 16-bit configurations: at that depth the
// products cost more than the weight bytes, and the sm90 kernels run them
// faster than mma.sync does.
//
// FUSED_MOE_GEMM_CONFIG=<name> forces a configuration: "fallback", a built
// row of configs.cmake, a 4-bit tile w4_tok<8|16|32|64>, or w4_dequant
// (tests and benchmarks use it). It is read on every call
// (getenv is cheap) so it can change at run time. A forced sm90 configuration
// runs the calls of its input kind (16-bit, FP8 block or FP8 row/col scales)
// where the sm90 path applies, the fallback where it does not; the other kinds
// keep their heuristics.
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
// w4_mma.cu: 4-bit weights on the tensor cores; tok 0 picks the tile.
bool w4_mma_fits(const GroupedGemmParams& p);
int w4_forced_tile(const char* name);
void grouped_gemm_w4(const GroupedGemmParams& p, int tok, cudaStream_t stream);
void dequantize_w4(const GroupedGemmParams& p, int e0, int count, void* out, cudaStream_t stream);

namespace {

// The forced configuration's name, or null.
const char* forced_config() {
  const char* name = std::getenv("FUSED_MOE_GEMM_CONFIG");
  return name && *name ? name : nullptr;
}

bool is_fallback(const char* name) { return std::strcmp(name, "fallback") == 0; }
bool is_dequant(const char* name) { return std::strcmp(name, "w4_dequant") == 0; }

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
  if (!forced || is_fallback(forced) || w4_forced_tile(forced) || is_dequant(forced)) return nullptr;
  std::string names = "fallback, w4_tok8, w4_tok16, w4_tok32, w4_tok64, w4_dequant";
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

// ---- 4-bit weights dequantized for the sm90 16-bit kernels -----------------

// From rows per expert on: past ~128, the tensor-core 4-bit kernel runs at
// about a third of the sm90 16-bit kernels' rate, and dequantizing an
// expert's weights costs about what ~190 rows of its products do (H200,
// benchmarks/RESULTS.md, "4-bit experts").
constexpr double kDequantRows = 128;
// Workspace for the dequantized experts of one step (at least one expert);
// FUSED_MOE_W4_DEQUANT_BYTES overrides it (tests: one expert a step).
size_t dequant_budget() {
  const char* bytes = std::getenv("FUSED_MOE_W4_DEQUANT_BYTES");
  return bytes && *bytes ? std::strtoull(bytes, nullptr, 10) : size_t(256) << 20;
}

size_t dequant_expert_bytes(const GroupedGemmParams& p) { return size_t(p.n) * p.k * 2; }

int dequant_chunk(const GroupedGemmParams& p) {
  const size_t fit = dequant_budget() / dequant_expert_bytes(p);
  return static_cast<int>(std::clamp<size_t>(fit, 1, size_t(p.num_experts)));
}

// The 16-bit call on experts [e0, e0 + count) of p, their weights at w16.
GroupedGemmParams dequant_slice(const GroupedGemmParams& p, int e0, int count, const void* w16) {
  GroupedGemmParams q = p;
  q.w4 = Packed4Scales{};
  q.w = w16;
  q.w_row_stride = p.k;
  q.w_expert_stride = p.n * p.k;
  q.expert_offsets = p.expert_offsets + e0;
  q.num_experts = count;
  if (p.bias) q.bias = static_cast<const char*>(p.bias) + size_t(e0) * p.n * 2;
  q.zero_tail = e0 + count == p.num_experts;
  return q;
}

// The configuration a slice runs, chosen on its share of the rows.
const sm90::Config* dequant_config(const GroupedGemmParams& q, int64_t rows_share,
                                   const DeviceInfo& d) {
  GroupedGemmParams h = q;
  h.rows = rows_share;
  return nearest_built(heuristic(h, d));
}

// The sm90 configuration that would run the dequantized slices, or null
// when this call stays 4-bit.
const sm90::Config* dequant_path(const GroupedGemmParams& p, const DeviceInfo& d) {
  if (p.w4.kind == Packed4::kNone || !w4_mma_fits(p)) return nullptr;
  const char* forced = forced_config();
  const bool force = forced && is_dequant(forced);
  if (forced && !force) return nullptr;
  if (!force && double(p.rows) / p.num_experts < kDequantRows) return nullptr;
  // Any 256-byte aligned address stands for the workspace in the check.
  const GroupedGemmParams q = dequant_slice(p, 0, dequant_chunk(p), reinterpret_cast<void*>(256));
  if (!sm90_applies(q, d)) return nullptr;
  return dequant_config(q, p.rows * q.num_experts / p.num_experts, d);
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t dequant_workspace_bytes(const GroupedGemmParams& p, const DeviceInfo& d) {
  const int chunk = dequant_chunk(p);
  const GroupedGemmParams q = dequant_slice(p, 0, chunk, reinterpret_cast<void*>(256));
  return align256(sm90_workspace_bytes(q, sm90::Inputs::k16bit, d.sm_count)) + chunk * dequant_expert_bytes(p);
}

// Step by step: dequantize `chunk` experts, multiply their rows; only the
// last step zeroes the rows past off[E] (earlier ones would zero rows a later
// step writes).
void run_dequantized(const GroupedGemmParams& p, void* workspace, const DeviceInfo& d,
                     cudaStream_t stream) {
  const int chunk = dequant_chunk(p);
  char* w16 = static_cast<char*>(workspace) +
              align256(sm90_workspace_bytes(dequant_slice(p, 0, chunk, workspace), sm90::Inputs::k16bit,
                                         d.sm_count));
  for (int e0 = 0; e0 < p.num_experts; e0 += chunk) {
    const int count = std::min(chunk, p.num_experts - e0);
    dequantize_w4(p, e0, count, w16, stream);
    const GroupedGemmParams q = dequant_slice(p, e0, count, w16);
    dequant_config(q, p.rows * count / p.num_experts, d)->run(q, workspace, d.sm_count, stream);
  }
}

}  // namespace

size_t grouped_gemm_workspace_bytes(const GroupedGemmParams& p) {
  if (p.rows == 0 || p.n == 0) return 0;
  const DeviceInfo& d = device_info();
  if (dequant_path(p, d)) return dequant_workspace_bytes(p, d);
  const sm90::Config* config = choose(p, d);
  return config ? sm90_workspace_bytes(p, config->inputs, d.sm_count) : 0;  // fallback: none
}

void grouped_gemm(const GroupedGemmParams& p, void* workspace, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return;
  const DeviceInfo& d = device_info();
  if (dequant_path(p, d)) return run_dequantized(p, workspace, d, stream);
  if (const sm90::Config* config = choose(p, d)) return config->run(p, workspace, d.sm_count, stream);
  const char* forced = forced_config();
  if (p.w4.kind != Packed4::kNone && !(forced && is_fallback(forced)) && w4_mma_fits(p))
    return grouped_gemm_w4(p, w4_forced_tile(forced), stream);
  grouped_gemm_fallback(p, stream);
}

}  // namespace fused_moe::cuda
