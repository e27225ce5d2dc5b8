// The grouped GEMMs' task plan, per-thread buffers, the choice of tile
// kernels, and the plain C++ tile kernels for CPUs without AVX2.
#include "cpu/gemm.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/epilogues.h"

namespace fused_moe::cpu {
namespace {

// Plain loops for CPUs without AVX2: 8 partial sums a dot product (loops
// the compiler vectorises), added in a fixed tree.
constexpr int kGenericRows = 4;
constexpr int kGenericCols = 16;
constexpr int kLanes = 8;

template <typename T>
float generic_dot_one(const float* x, const T* y, int64_t k) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += x[i + l] * static_cast<float>(y[i + l]);
  for (int l = 0; i + l < k; ++l) part[l] += x[i + l] * static_cast<float>(y[i + l]);
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) part[l] += part[l + half];
  return part[0];
}

template <typename T>
void generic_dot(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k, float* c,
                 int ldc) {
  for (int r = 0; r < n_a; ++r)
    for (int j = 0; j < n_w; ++j)
      c[r * ldc + j] = generic_dot_one(static_cast<const float*>(a[r]), static_cast<const T*>(w[j]), k);
}

const TileKernels kGenericTiles = {
    "generic",
    kGenericRows,
    kGenericCols,
    {generic_dot<float>, generic_dot<BFloat16>, generic_dot<Half>},
    {kF32, kF32, kF32},
    &kEpilogues,
};

#if defined(__x86_64__)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
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

// A task's cost in rows: its first row tile reads the weights from memory,
// which costs about as much as this many more rows.
constexpr int64_t kReadCost = 2;
// Rows a task sweeps at most, so that one expert with many rows still
// splits over threads.
constexpr int64_t kTaskRows = 256;
// Below this many multiply-adds a GEMM runs on the calling thread.
constexpr double kSerialMacs = 1 << 18;

// n floats of v from a cache line on (v grows to hold them).
float* on_line(std::vector<float>& v, size_t n) {
  constexpr size_t kLine = 64 / sizeof(float);
  if (v.size() < n + kLine) v.resize(n + kLine);
  const size_t past = reinterpret_cast<uintptr_t>(v.data()) / sizeof(float) % kLine;
  return v.data() + (kLine - past) % kLine;
}

}  // namespace

const TileKernels& tile_kernels() {
  static const TileKernels* chosen = choose_tiles();
  return *chosen;
}

GemmPlan plan_gemm(const GemmShape& g, int per_task, int threads) {
  GemmPlan plan;
  const int64_t blocks = (g.cols.count + per_task - 1) / per_task;
  std::vector<int64_t> cost;
  double macs = 0;
  for (int e = 0; e < g.num_experts; ++e) {
    const int64_t n = g.offsets[e + 1] - g.offsets[e];
    if (n <= 0) continue;
    macs += double(n) * g.cols.count * g.k;
    const int64_t chunks = (n + kTaskRows - 1) / kTaskRows;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = g.offsets[e] + n * c / chunks, r1 = g.offsets[e] + n * (c + 1) / chunks;
      for (int64_t q = 0; q < blocks; ++q) {
        plan.tasks.push_back({e, r0, r1, q * per_task});
        cost.push_back(r1 - r0 + kReadCost);
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
  if (s.wide.size() < size_t(tk.rows * k)) s.wide.resize(tk.rows * k);
  s.sums = on_line(s.sums_floats, tk.rows * tk.cols);
  if (tk.pack_rows) s.panel = on_line(s.panel_floats, tk.cols * k);
  return s;
}

}  // namespace fused_moe::cpu
