// Token permute (gather rows into expert order) and weighted unpermute on the CPU.
#include <cstring>
#include <vector>

#include "cpu/gemm.h"

namespace fused_moe::cpu {
namespace {

// Local expert of a global id, -1 when the slot is not computed here.
int local_expert(const PermuteParams& p, int32_t id) {
  if (id < 0 || id >= p.num_experts) return -1;
  return p.expert_map ? p.expert_map[id] : id;
}

template <typename T>
void copy_row(const T* src, T* dst, int64_t h, const float* scale) {
  if (scale == nullptr) {
    std::memcpy(dst, src, h * sizeof(T));
    return;
  }
  for (int64_t i = 0; i < h; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * *scale);
}

}  // namespace

void sort_slots(const PermuteParams& p) {
  const int64_t slots = p.num_tokens * p.topk;
  std::vector<int32_t> count(p.num_local_experts + 1, 0);
  for (int64_t s = 0; s < slots; ++s) {
    const int e = local_expert(p, p.topk_ids[s]);
    if (e >= 0) ++count[e + 1];
  }
  p.expert_offsets[0] = 0;
  for (int e = 0; e < p.num_local_experts; ++e)
    p.expert_offsets[e + 1] = p.expert_offsets[e] + count[e + 1];

  // Slots in index order keep their order within each expert: a stable sort.
  std::vector<int32_t> next(p.expert_offsets, p.expert_offsets + p.num_local_experts);
  for (int64_t s = 0; s < slots; ++s) {
    const int e = local_expert(p, p.topk_ids[s]);
    p.inv_index[s] = e >= 0 ? next[e]++ : -1;
  }
}

void permute(const PermuteParams& p) {
  sort_slots(p);
  const int64_t slots = p.num_tokens * p.topk;
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const int64_t h = p.hidden;
    parallel_rows(slots, 256, [&](int64_t b, int64_t end) {
      for (int64_t s = b; s < end; ++s) {
        if (p.inv_index[s] < 0) continue;
        const float* scale = p.row_weights ? p.row_weights + s : nullptr;
        copy_row(x + (s / p.topk) * p.x_stride, out + p.inv_index[s] * h, h, scale);
      }
    });
    const int64_t used = p.expert_offsets[p.num_local_experts];
    std::fill(out + used * h, out + slots * h, T(0.0f));
  });
}

void unpermute(const UnpermuteParams& p) {
  const Elem elem = elem_of(p.dtype);
  const Epilogues& ep = epilogues();
  const int64_t h = p.hidden;
  const int64_t elem_bytes = elem == kF32 ? 4 : 2;
  const int64_t row_bytes = h * elem_bytes, y_row_bytes = p.y_stride * elem_bytes;
  const char* y = static_cast<const char*>(p.y);
  char* out = static_cast<char*>(p.out);
  parallel_rows(p.num_tokens, 16, [&](int64_t b, int64_t end) {
    std::vector<float> acc(h);
    for (int64_t t = b; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k = 0; k < p.topk; ++k) {
        const int32_t row = p.inv_index[t * p.topk + k];
        if (row < 0) continue;
        const float w = p.weights ? p.weights[t * p.topk + k] : 1.0f;
        ep.accumulate[elem](acc.data(), y + row * y_row_bytes, w, h);
      }
      ep.store[elem](acc.data(), 0, 1, static_cast<int>(h), nullptr, out + t * row_bytes, 0);
    }
  });
}

}  // namespace fused_moe::cpu
