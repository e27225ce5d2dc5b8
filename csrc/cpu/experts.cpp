// fused_experts on the CPU, each expert's weights read once a call:
//   route:   the local slots sorted by expert (permute's order), rows r
//   up:      act[r] = act(w13[e] x[token(r)] + b13[e]), x rows read in place;
//            gate and up rows share a tile, so each tile's sums go straight
//            through the activation
//   down:    y[r] = w2[e] act[r] + b2[e]
//   combine: out[t] = sum over k = 0..K-1 of w[t,k] * y[row(t,k)] (unpermute)
// Rounding follows the composed ops and the CUDA kernels: GEMM outputs are
// rounded to T before the activation and before the weighted sum.
#include <vector>

#include "cpu/common.h"
#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

// Where the sorted rows come from: x at each row's token, or, with the
// router weight on the input, rows scaled and sorted by permute.
struct Rows {
  std::vector<int32_t> offsets;  // [E_local + 1]
  std::vector<int32_t> inv;      // [M*K]: sorted row of each slot, -1 if not local
  std::vector<int32_t> token;    // [rows]: token of each sorted row
  const void* a = nullptr;       // GEMM 1's A
  const int32_t* a_index = nullptr;
  int64_t a_stride = 0;
};

Rows sort_rows(const DecodeParams& p) {
  Rows r;
  r.offsets.resize(p.num_local_experts + 1);
  r.inv.resize(p.num_tokens * p.topk);
  PermuteParams pp;
  pp.x = p.x;
  pp.x_stride = p.x_stride;
  pp.dtype = p.dtype;
  pp.topk_ids = p.topk_ids;
  pp.expert_map = p.expert_map;
  pp.expert_offsets = r.offsets.data();
  pp.inv_index = r.inv.data();
  pp.num_tokens = p.num_tokens;
  pp.hidden = p.hidden;
  pp.topk = p.topk;
  pp.num_experts = p.num_experts;
  pp.num_local_experts = p.num_local_experts;
  if (p.weight_on_input) {
    // y is free until the second GEMM: it holds the scaled rows until then.
    pp.row_weights = p.topk_weights;
    pp.out = p.y;
    permute(pp);
    r.a = p.y;
    r.a_stride = p.hidden;
    return r;
  }
  sort_slots(pp);
  r.token.resize(r.offsets[p.num_local_experts]);
  for (size_t s = 0; s < r.inv.size(); ++s)
    if (r.inv[s] >= 0) r.token[r.inv[s]] = static_cast<int32_t>(s / p.topk);
  r.a = p.x;
  r.a_index = r.token.data();
  r.a_stride = p.x_stride;
  return r;
}

template <typename T>
void up_projection(const DecodeParams& p, const Rows& rows) {
  GemmShape g = plain_gemm(rows.a, p.w13, p.gated ? 2 * p.inter : p.inter, p.hidden,
                           rows.offsets.data(), p.num_local_experts);
  g.a_index = rows.a_index;
  g.a_stride = rows.a_stride;
  g.w_expert_stride = p.w13_expert_stride;
  g.w_row_stride = p.w13_row_stride;
  g.cols.count = p.inter;
  if (p.gated) {
    g.cols.paired = true;
    const bool interleaved = p.activation == Activation::kSwigluOai;  // g0, u0, g1, u1, ...
    g.cols.stride = interleaved ? 2 : 1;
    g.cols.up = interleaved ? 1 : p.inter;
  }
  const T* bias = static_cast<const T*>(p.w13_bias);
  T* act = static_cast<T*>(p.act);
  const auto activate = epilogues().activate[elem_of<T>()][static_cast<int>(p.activation)];
  grouped_gemm_tiles<T>(g, [&](const TileSums& s) {
    float bias_gate[kMaxTileCols], bias_up[kMaxTileCols];
    const int64_t b = s.e * g.w_rows + s.col * g.cols.stride;
    bias_floats(bias, b, g.cols.stride, s.count, bias_gate);
    bias_floats(bias, b + g.cols.up, g.cols.stride, s.count, bias_up);
    activate({s.sums, s.up, s.ld, s.rows, s.count, bias_gate, bias_up,
              act + s.row * p.inter + s.col, p.inter});
  });
}

template <typename T>
void down_projection(const DecodeParams& p, const Rows& rows) {
  GemmShape g = plain_gemm(p.act, p.w2, p.hidden, p.inter, rows.offsets.data(),
                           p.num_local_experts);
  g.w_expert_stride = p.w2_expert_stride;
  g.w_row_stride = p.w2_row_stride;
  grouped_gemm_store<T>(g, static_cast<const T*>(p.w2_bias), static_cast<T*>(p.y));
}

}  // namespace

void fused_experts(const DecodeParams& p) {
  const Rows rows = sort_rows(p);
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    up_projection<T>(p, rows);
    down_projection<T>(p, rows);
  });
  UnpermuteParams u;
  u.y = p.y;
  u.y_stride = p.hidden;
  u.dtype = p.dtype;
  u.rows = rows.offsets[p.num_local_experts];
  u.inv_index = rows.inv.data();
  u.weights = p.weight_on_input ? nullptr : p.topk_weights;
  u.out = p.out;
  u.num_tokens = p.num_tokens;
  u.hidden = p.hidden;
  u.topk = p.topk;
  unpermute(u);
}

}  // namespace fused_moe::cpu
