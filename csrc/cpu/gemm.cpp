// The grouped GEMMs' task plan, per-thread buffers, the choice of tile
// kernels, and the plain C++ tile kernels for CPUs without AVX2.
#include "cpu/gemm.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

// Plain loops the compiler vectorises over the panel's columns: the same
// k-order sums as the x86 kernels.
constexpr int kGenericRows = 4;
constexpr int kGenericCols = 16;

template <typename T>
void generic_pack(const void* const* w, int64_t k, void* out) {
  float* panel = static_cast<float*>(out);
  for (int j = 0; j < kGenericCols; ++j) {
    const T* row = static_cast<const T*>(w[j]);
    for (int64_t i = 0; i < k; ++i) panel[i * kGenericCols + j] = row ? static_cast<float>(row[i]) : 0.0f;
  }
}

void generic_tile(const void* const* a, int n, const void* panel, int64_t k, float* c) {
  const float* p = static_cast<const float*>(panel);
  for (int r = 0; r < n; ++r) {
    const float* x = static_cast<const float*>(a[r]);
    float acc[kGenericCols] = {};
    for (int64_t i = 0; i < k; ++i)
      for (int j = 0; j < kGenericCols; ++j) acc[j] += x[i] * p[i * kGenericCols + j];
    std::memcpy(c + r * kGenericCols, acc, sizeof(acc));
  }
}

const TileKernels kGenericTiles = {
    "generic",
    kGenericRows,
    kGenericCols,
    {generic_pack<float>, generic_pack<BFloat16>, generic_pack<Half>},
    {generic_tile, generic_tile, generic_tile},
    {kF32, kF32, kF32},
    &kEpilogues,
};

#if defined(__x86_64__)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

const TileKernels* choose_tiles() {
  const char* env = std::getenv("FUSED_MOE_CPU_ISA");
  const std::string cap = env ? env : "";
  if (!cap.empty() && cap != "avx512" && cap != "avx2" && cap != "generic")
    throw std::runtime_error("fused_moe: FUSED_MOE_CPU_ISA must be avx512, avx2 or generic, got '" +
                             cap + "'");
  if ((cap.empty() || cap == "avx512") && has_avx512()) return avx512_tiles();
  if (cap != "generic" && has_avx2()) return avx2_tiles();
  return &kGenericTiles;
}

// A task's cost in rows: packing its panel costs about as much as this many
// rows of multiply-adds.
constexpr int64_t kPackCost = 2;
// Rows a task sweeps at most, so that one expert with many rows still
// splits over threads.
constexpr int64_t kTaskRows = 256;
// Below this many multiply-adds a GEMM runs on the calling thread.
constexpr double kSerialMacs = 1 << 18;

}  // namespace

const TileKernels& tile_kernels() {
  static const TileKernels* chosen = choose_tiles();
  return *chosen;
}

GemmPlan plan_gemm(const GemmShape& g, int per_panel, int threads) {
  GemmPlan plan;
  const int64_t panels = (g.cols.count + per_panel - 1) / per_panel;
  std::vector<int64_t> cost;
  double macs = 0;
  for (int e = 0; e < g.num_experts; ++e) {
    const int64_t n = g.offsets[e + 1] - g.offsets[e];
    if (n <= 0) continue;
    macs += double(n) * g.cols.count * g.k;
    const int64_t chunks = (n + kTaskRows - 1) / kTaskRows;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = g.offsets[e] + n * c / chunks, r1 = g.offsets[e] + n * (c + 1) / chunks;
      for (int64_t q = 0; q < panels; ++q) {
        plan.tasks.push_back({e, r0, r1, q * per_panel});
        cost.push_back(r1 - r0 + kPackCost);
      }
    }
  }
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  // Thread p takes the tasks that start in its share [p, p + 1) * total / threads.
  plan.first.assign(threads + 1, plan.tasks.size());
  int64_t before = 0;
  int next = 0;
  for (size_t i = 0; i < plan.tasks.size(); ++i) {
    const int p = static_cast<int>(before * threads / total);
    while (next <= p) plan.first[next++] = i;
    before += cost[i];
  }
  plan.parallel = threads > 1 && macs >= kSerialMacs;
  return plan;
}

GemmScratch& gemm_scratch(const TileKernels& tk, int64_t k) {
  thread_local GemmScratch s;
  const size_t panel = panel_bytes(tk, k) / sizeof(float);
  if (s.panel.size() < panel) s.panel.resize(panel);
  if (s.wide.size() < size_t(tk.rows * k)) s.wide.resize(tk.rows * k);
  if (s.sums.size() < size_t(tk.rows * tk.cols)) s.sums.resize(tk.rows * tk.cols);
  return s;
}

}  // namespace fused_moe::cpu
