// Grouped GEMMs over expert-sorted rows on the CPU: how the work is split
// into tasks and threads, and how rows reach the tile kernels of
// cpu/tiles.h; what happens to the sums is the caller's epilogue.
//
// A task is one expert's block of output columns for a run of its rows: it
// sweeps the rows over the block's weight rows, so each weight is read from
// memory once a task (later row tiles find it in cache), and A rows are
// read in place (gathered by index, no copy). With enough rows, a table's
// packed tiles take the weight rows from a panel packed once a task
// instead (cpu/tiles.h), prefetching the rows of the thread's next task so
// that reading them from memory overlaps the products. Tasks go to threads
// in contiguous runs of about equal cost; every output is computed by one
// tile, and tasks are cut from each expert's rows alone, so the result is
// the same whatever the thread count.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/tiles.h"

namespace fused_moe::cpu {

// The tile kernels of this CPU: the widest instruction set it has, capped
// by FUSED_MOE_CPU_ISA=avx512|avx2|generic when that is set.
const TileKernels& tile_kernels();

template <typename T>
constexpr Elem elem_of() {
  if constexpr (std::is_same_v<T, float>) return kF32;
  else if constexpr (std::is_same_v<T, BFloat16>) return kBF16;
  else return kF16;
}

inline Elem elem_of(ScalarType t) {
  return t == ScalarType::Float ? kF32 : t == ScalarType::BFloat16 ? kBF16 : kF16;
}

inline const Epilogues& epilogues() { return *tile_kernels().epilogues; }

// The weight rows behind output column j: row j * stride, and for paired
// columns (the first GEMM of gated experts) also the up row up + j * stride;
// a tile then takes its outputs' gate rows followed by their up rows.
struct Columns {
  int64_t count = 0;  // output columns
  bool paired = false;
  int64_t stride = 1;
  int64_t up = 0;
};

// For each expert e and row r in [offsets[e], offsets[e+1]): A row r times
// the weight rows of every output column of e.
struct GemmShape {
  const void* a = nullptr;           // row r at a + (a_index ? a_index[r] : r) * a_stride
  const int32_t* a_index = nullptr;
  int64_t a_stride = 0;
  const void* w = nullptr;           // [E, w_rows, k]: row j of e at w + e * w_expert_stride
  int64_t w_rows = 0;                //   + j * w_row_stride
  int64_t w_expert_stride = 0, w_row_stride = 0;
  int64_t k = 0;
  Columns cols;
  const int32_t* offsets = nullptr;  // [E + 1]
  int num_experts = 0;
};

// The plain case: n output columns, column j from weight row j; dense
// operands unless the strides are set after.
inline GemmShape plain_gemm(const void* a, const void* w, int64_t n, int64_t k,
                            const int32_t* offsets, int num_experts) {
  GemmShape g;
  g.a = a;
  g.a_stride = k;
  g.w = w;
  g.w_rows = n;
  g.w_expert_stride = n * k;
  g.w_row_stride = k;
  g.k = k;
  g.cols.count = n;
  g.offsets = offsets;
  g.num_experts = num_experts;
  return g;
}

// What a tile hands its epilogue: rows [row, row + rows) of expert e and
// output columns [col, col + count); sums[r * ld + j], and for paired
// columns the up sums at up[r * ld + j].
struct TileSums {
  int e;
  int64_t row;
  int rows;
  int64_t col;
  int count;
  const float* sums;
  const float* up;
  int ld;
};

struct GemmTask {
  int e;
  int64_t row0, row1;
  int64_t col0;
};

struct GemmPlan {
  std::vector<GemmTask> tasks;
  std::vector<size_t> first;  // thread p runs tasks [first[p], first[p + 1])
  bool parallel = false;      // false: too little work to wake the threads
};

GemmPlan plan_gemm(const GemmShape& g, int per_task, int threads);

// Per-thread buffers: widened A rows, the tile's sums and the packed weights
// (these two in their vectors from a cache line on, so that a vector load or
// store of them touches one line, not two).
struct GemmScratch {
  std::vector<float> wide, sums_floats, panel_floats;
  float* sums = nullptr;
  float* panel = nullptr;
};
GemmScratch& gemm_scratch(const TileKernels& tk, int64_t k);

// out[j] = bias[first + j * stride] as floats for j < n, zeros without a bias.
template <typename T>
void bias_floats(const T* bias, int64_t first, int64_t stride, int n, float* out) {
  for (int j = 0; j < n; ++j) out[j] = bias ? static_cast<float>(bias[first + j * stride]) : 0.0f;
}

template <typename T>
const void* widen_row(const T* src, int64_t k, float* dst) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<float>(src[i]);
  return dst;
}

// The weight rows of task t's outputs into rows (paired: the gate rows,
// then the up rows); returns their count, with the task's outputs in count.
template <typename T>
int task_weight_rows(const GemmShape& g, int per_task, const GemmTask& t, const void** rows,
                     int& count) {
  count = static_cast<int>(std::min<int64_t>(per_task, g.cols.count - t.col0));
  const T* w = static_cast<const T*>(g.w) + t.e * g.w_expert_stride;
  for (int j = 0; j < count; ++j) {
    const int64_t col = t.col0 + j;
    rows[j] = w + col * g.cols.stride * g.w_row_stride;
    if (g.cols.paired) rows[count + j] = w + (g.cols.up + col * g.cols.stride) * g.w_row_stride;
  }
  return g.cols.paired ? 2 * count : count;
}

// Runs task t; next (nullptr if none) is the task this thread runs after it,
// whose weight rows packed tiles prefetch.
template <typename T, typename Epilogue>
void run_gemm_task(const GemmShape& g, const TileKernels& tk, const GemmTask& t,
                   const GemmTask* next, GemmScratch& s, const Epilogue& epilogue) {
  constexpr Elem elem = elem_of<T>();
  const int per_task = g.cols.paired ? tk.cols / 2 : tk.cols;
  const void* rows[kMaxTileCols];
  int count;
  const int n_w = task_weight_rows<T>(g, per_task, t, rows, count);
  const bool widen = tk.a_elem[elem] != elem;
  const bool packed = tk.packed_dot[elem] && t.row1 - t.row0 >= tk.pack_rows;
  const void* next_rows[kMaxTileCols];
  Prefetch ahead{next_rows, 0, g.k * static_cast<int64_t>(sizeof(T))};
  if (packed) {
    tk.pack[elem](rows, n_w, g.k, s.panel);
    int next_count;
    if (next) ahead.n = task_weight_rows<T>(g, per_task, *next, next_rows, next_count);
  }
  for (int64_t r0 = t.row0; r0 < t.row1; r0 += tk.rows) {
    const int n = static_cast<int>(std::min<int64_t>(tk.rows, t.row1 - r0));
    const void* a[kMaxTileRows];
    for (int i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const T* src = static_cast<const T*>(g.a) + (g.a_index ? g.a_index[r] : r) * g.a_stride;
      a[i] = widen ? widen_row(src, g.k, s.wide.data() + i * g.k) : src;
    }
    if (packed) tk.packed_dot[elem](a, n, s.panel, g.k, s.sums, tk.cols, ahead);
    else tk.dot[elem](a, n, rows, n_w, g.k, s.sums, tk.cols);
    epilogue(TileSums{t.e, r0, n, t.col0, count, s.sums,
                      g.cols.paired ? s.sums + count : nullptr, tk.cols});
  }
}

// Runs the grouped GEMM g over elements of type T, calling epilogue(TileSums)
// for every tile (from any thread; tiles never overlap).
template <typename T, typename Epilogue>
void grouped_gemm_tiles(const GemmShape& g, const Epilogue& epilogue) {
  const TileKernels& tk = tile_kernels();
  const int per_task = g.cols.paired ? tk.cols / 2 : tk.cols;
  const int threads = static_cast<int>(torch::stable::get_num_threads());
  const GemmPlan plan = plan_gemm(g, per_task, threads);
  auto run = [&](int64_t begin, int64_t end) {
    GemmScratch& s = gemm_scratch(tk, g.k);
    for (int64_t p = begin; p < end; ++p)
      for (size_t i = plan.first[p]; i < plan.first[p + 1]; ++i)
        run_gemm_task<T>(g, tk, plan.tasks[i],
                         i + 1 < plan.first[p + 1] ? &plan.tasks[i + 1] : nullptr, s, epilogue);
  };
  if (plan.parallel) {
    torch::stable::parallel_for(0, threads, 1, run);
  } else {
    run(0, threads);
  }
}

}  // namespace fused_moe::cpu

namespace fused_moe::cpu {

// The plain grouped GEMM over inputs of type In: out[r][j] = sums + bias[e][j], stored as T.
template <typename T, typename In = T>
void grouped_gemm_store(const GemmShape& g, const T* bias, T* out) {
  const auto store = epilogues().store[elem_of<T>()];
  const int64_t n = g.cols.count;
  grouped_gemm_tiles<In>(g, [&](const TileSums& s) {
    float b[kMaxTileCols];
    bias_floats(bias, s.e * n + s.col, 1, s.count, b);
    store(s.sums, s.ld, s.rows, s.count, bias ? b : nullptr, out + s.row * n + s.col, n);
  });
}

}  // namespace fused_moe::cpu
