// The vectorised inner loops of the CPU GEMMs: one table per instruction set.
//
// Rows of A are multiplied by a panel: `cols` weight rows repacked so that
// one k step reads all of the panel's columns as contiguous vectors, while
// the row's element k is broadcast. Every output is then summed in k order,
// one multiply-add a k (a pair of k for the bf16 dot product), so its bits
// depend on its row of A, its weight row and K alone: not on the rows or
// columns computed with it, nor on the thread that computes it.
//
// The instruction-set files are compiled with their own -m flags: an inline
// function they shared with the rest of the build could be linked into it in
// its AVX-512 form. So they call no inline function of another header (torch
// headers included), and what they include of ours is in unnamed namespaces.
#pragma once

#include <cstdint>

namespace fused_moe::cpu {

// Element types, as the tables index them.
enum Elem : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumElems = 3 };

// Bounds of every table's rows and cols, for callers' fixed arrays.
constexpr int kMaxTileRows = 8;
constexpr int kMaxPanelCols = 64;

// The epilogues, compiled with each table's instructions like its tiles
// (cpu/epilogues.h): they run once per output, often enough to count.
constexpr int kNumActivations = 5;  // fused_moe::Activation's values

// out[r * ld_out + j] = act(rounded(gate[r * ld + j] + bias_gate[j])), or with
// up, gated_act(that, rounded(up[r * ld + j] + bias_up[j])); rounded to and
// stored as the element type, for r < rows, j < n.
struct ActRows {
  const float* gate;
  const float* up;  // nullptr: not gated
  int ld;
  int rows;
  int n;
  const float* bias_gate;  // [n]
  const float* bias_up;    // [n]
  void* out;
  int64_t ld_out;
};

struct Epilogues {
  void (*activate[kNumElems][kNumActivations])(const ActRows& a);
  // out[r * ld_out + j] = sums[r * ld + j] + bias[j] (bias may be nullptr),
  // stored as the element type.
  void (*store[kNumElems])(const float* sums, int ld, int rows, int n, const float* bias, void* out,
                           int64_t ld_out);
  // acc[i] += w * y[i], i < n, a multiply then an add.
  void (*accumulate[kNumElems])(float* acc, const void* y, float w, int64_t n);
};

struct TileKernels {
  const char* name;
  int rows;  // rows of A one tile call takes at most
  int cols;  // columns of a panel
  // pack[elem](w, k, panel): column j of the panel is weight row w[j]
  // (k elements; nullptr: a column of zeros). A panel takes at most
  // panel_bytes(k) bytes.
  void (*pack[kNumElems])(const void* const* w, int64_t k, void* panel);
  // tile[elem](a, n, panel, k, c): c[r * cols + j] = sum over i < k of
  // a[r][i] * column j, for r < n <= rows; a's rows are of type a_elem[elem].
  void (*tile[kNumElems])(const void* const* a, int n, const void* panel, int64_t k, float* c);
  Elem a_elem[kNumElems];  // kF32 where A rows of this type are first widened to float
  const Epilogues* epilogues;
};

inline int64_t panel_bytes(const TileKernels& t, int64_t k) {
  return (k + 1) / 2 * 2 * t.cols * int64_t(sizeof(float));
}

// The tables of the x86 files, nullptr where the build is not for x86; the
// caller checks that the CPU has the instructions.
const TileKernels* avx512_tiles();  // AVX-512 F/BW/VL with BF16 dot products
const TileKernels* avx2_tiles();    // AVX2 with FMA and F16C

}  // namespace fused_moe::cpu
