// The vectorised inner loops of the CPU GEMMs: one table per instruction set.
//
// A tile multiplies a few rows of A by a block of weight rows, both read in
// place (K contiguous): each output is a dot product summed in vector lanes,
// lane l taking elements l, l + L, l + 2L, ... (pairs of them for the bf16
// dot product), and the L lanes then added in a fixed tree. A table may
// also have packed tiles for tasks of many rows (pack_rows below), which sum
// each output in k order instead. So an output's bits depend on its row of
// A, its weight row, K, the instruction set and whether its task's rows
// reach pack_rows: not on the rows or columns computed with it, nor on the
// thread.
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
constexpr int kMaxTileCols = 64;

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

// Weight rows that packed tiles pull into cache, a line a k step, while
// they run: the next task's, so that its reads from memory overlap this
// task's products (its packing would otherwise wait on them all at once).
// The tiles advance row and at (the next line: rows[row] + at).
struct Prefetch {
  const void* const* rows;
  int n;          // rows
  int64_t bytes;  // of each row
  int row = 0;
  int64_t at = 0;
};

struct TileKernels {
  const char* name;
  int rows;  // rows of A one call takes at most
  int cols;  // weight rows one call takes at most
  // dot[elem](a, n_a, w, n_w, k, c, ldc): c[r * ldc + j] = a[r] . w[j] over k
  // elements, for r < n_a <= rows and j < n_w <= cols. w's rows are of type
  // elem, a's of type a_elem[elem] (kF32: the caller widens them first).
  void (*dot[kNumElems])(const void* const* a, int n_a, const void* const* w, int n_w, int64_t k,
                         float* c, int ldc);
  Elem a_elem[kNumElems];
  const Epilogues* epilogues;
  // Tasks of at least pack_rows rows (0: none) whose elem has a packed_dot
  // pack their weight rows once, pack[elem](w, n_w, k, panel) with n_w <= cols,
  // into a panel of cols * k floats at most; then packed_dot[elem](a, n_a,
  // panel, k, c, ldc) sets c[r * ldc + j] = a[r] . w[j] for r < n_a <= rows
  // and every j < cols (zeros past n_w). Summed in another order than dot's:
  // which one an output takes depends on its task's row count.
  int pack_rows;
  void (*pack[kNumElems])(const void* const* w, int n_w, int64_t k, void* panel);
  void (*packed_dot[kNumElems])(const void* const* a, int n_a, const void* panel, int64_t k,
                                float* c, int ldc, Prefetch& ahead);
  // 4-bit weights to a 16-bit elem (nullptr: none, the caller decodes):
  // decode4[elem](q, groups, group, base, scales, zeros, out) sets element c
  // of group g of a row to (base[code] - zeros[g]) * scales[g] rounded to
  // elem, for groups of `group` columns (a multiple of 32); q holds two codes
  // a byte, the even column in the low nibble.
  void (*decode4[kNumElems])(const uint8_t* q, int64_t groups, int64_t group, const float* base,
                             const float* scales, const float* zeros, void* out);
  // e4m3fn to floats (nullptr: none): out[i] = value(q[i]) * scale for i < n,
  // the same floats as the scalar conversion times the scale.
  void (*decode_fp8)(const uint8_t* q, int64_t n, float scale, float* out);
};

// The tables of the x86 files, nullptr where the build is not for x86; the
// caller checks that the CPU has the instructions.
const TileKernels* avx512_tiles();  // AVX-512 F/BW/VL/DQ with BF16 dot products
const TileKernels* avx2_tiles();    // AVX2 with FMA and F16C

}  // namespace fused_moe::cpu
