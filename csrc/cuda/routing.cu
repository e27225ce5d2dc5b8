// Top-k routing: one warp per token. Lane l holds the scores of experts
// [l*N, l*N + N) in registers (N = E/32 rounded up to a power of two), turned
// into order-preserving integer keys, so every warp-wide argmax is one max and
// one min reduction. Agrees with cpu/routing.cpp: NaN ranks below every number,
// ties go to the lower index, and a selection never repeats an expert.
#include <cmath>

#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kWarps = 4;  // tokens per block
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopk = 32;

// Keys: larger key = better. Real scores map above kKeyNan, so the reserved
// values order: nothing (padding, already taken) < dropped group < NaN < numbers.
constexpr uint32_t kKeyNone = 0;
constexpr uint32_t kKeyMasked = 1;
constexpr uint32_t kKeyNan = 2;

enum GroupMode : int {
  kNoGroups = 0,
  kGroupsInLanes = 1,  // group size a power of two >= N: a group is whole lanes
  kGroupsInSmem = 2,   // any other group size: through shared memory
};

__device__ __forceinline__ uint32_t order_key(float f) {
  if (f != f) return kKeyNan;
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0;  // -0 == +0: equal numbers must tie
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // -inf -> 0x007fffff > kKeyNan
}

__device__ __forceinline__ float key_value(uint32_t k) {
  if (k == kKeyNan) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Butterfly sum: every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
#endif
}

__device__ __forceinline__ uint32_t warp_min_u32(uint32_t v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFullMask, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
#endif
}

// x[i] = row[first + i] for first + i < n, else `fill`; whole 16-byte loads
// when this lane's N elements are aligned vectors.
template <int N, typename T>
__device__ __forceinline__ void load_lane(const T* row, int first, int n, float fill,
                                          float (&x)[N]) {
  constexpr int P = kVec<T>;
  if constexpr (N % P == 0) {
    if (first + N <= n && aligned16(row + first)) {
#pragma unroll
      for (int j = 0; j < N; j += P) {
        const Pack<T, P> v = load_pack<T, P>(row + first + j);
#pragma unroll
        for (int q = 0; q < P; ++q) x[j + q] = to_float(v.e[q]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = first + i < n ? to_float(row[first + i]) : fill;
}

// Adds key k to a running top two (a >= b) of a multiset.
__device__ __forceinline__ void push_top2(uint32_t k, uint32_t& a, uint32_t& b) {
  b = max(b, min(a, k));
  a = max(a, k);
}

// A group's score from its top two biased keys: their sum with a bias, else the max.
__device__ __forceinline__ uint32_t group_key(uint32_t a, uint32_t b, bool sum_top2) {
  return sum_top2 ? order_key(key_value(a) + key_value(b)) : a;
}

// Repeated argmax over items held N per lane (item = lane * N + slot). Each lane
// caches its best two untaken keys: a win moves the second up, and only a lane
// that wins again before rescanning reads all its N registers.
template <int N>
struct WarpTop {
  uint32_t key[N];
  uint32_t taken = 0;  // bit i: slot i already popped
  uint32_t k1 = 0, k2 = 0;
  int s1 = 0, s2 = 0;

  __device__ __forceinline__ void scan() {
    k1 = k2 = kKeyNone;
    s1 = s2 = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const uint32_t k = (taken >> i) & 1u ? kKeyNone : key[i];
      if (k > k1) {
        k2 = k1, s2 = s1, k1 = k, s1 = i;
      } else if (k > k2) {
        k2 = k, s2 = i;
      }
    }
  }

  // The best untaken item of the warp, lowest index among equal keys; every
  // lane gets it and its key.
  __device__ __forceinline__ int pop(int lane, uint32_t& best) {
    best = warp_max_u32(k1);
    const int w = static_cast<int>(warp_min_u32(k1 == best ? lane * N + s1 : 0xffffffffu));
    if (lane == w / N) {
      taken |= 1u << s1;
      if (k2 != kKeyNone) {
        k1 = k2, s1 = s2, k2 = kKeyNone;  // the next best of this lane, rest unknown
      } else {
        scan();
      }
    }
    return w;
  }
};

// Grouped top-k, group size S a power of two >= N: group g is the S/N lanes
// from g*S/N, reduced with butterflies; the kept groups are chosen one per round.
template <int N>
__device__ void mask_groups_in_lanes(const TopkParams& p, int lane, uint32_t (&key)[N]) {
  const int size = p.num_experts / p.num_groups;
  const int lanes = size / N;  // a power of two <= 32
  uint32_t a = kKeyNone, b = kKeyNone;
#pragma unroll
  for (int i = 0; i < N; ++i) push_top2(key[i], a, b);
  for (int o = 1; o < lanes; o <<= 1) {
    const uint32_t a2 = __shfl_xor_sync(kFullMask, a, o);
    const uint32_t b2 = __shfl_xor_sync(kFullMask, b, o);
    b = max(min(a, a2), max(b, b2));
    a = max(a, a2);
  }
  const bool real = lane * N < p.num_experts;  // lanes past E hold no group
  uint32_t cand = real ? group_key(a, b, p.bias != nullptr && size > 1) : kKeyNone;
  bool kept = false;
  for (int r = 0; r < p.topk_group; ++r) {
    const uint32_t best = warp_max_u32(cand);
    const uint32_t w = warp_min_u32(cand == best ? static_cast<uint32_t>(lane) : 32u);
    if (lane / lanes == static_cast<int>(w) / lanes) kept = true, cand = kKeyNone;
  }
  if (real && !kept) {
#pragma unroll
    for (int i = 0; i < N; ++i) key[i] = kKeyMasked;
  }
}

// Grouped top-k for any group size: the keys go to shared memory (E keys, then
// G group keys, per warp), one lane scores each group, and a WarpTop over the
// group keys finds the last kept group; every group ranked at or above it stays.
template <int N>
__device__ void mask_groups_in_smem(const TopkParams& p, int lane, uint32_t* smem,
                                    uint32_t (&key)[N]) {
  const int E = p.num_experts, G = p.num_groups, size = E / G, first = lane * N;
  uint32_t* group = smem + E;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (first + i < E) smem[first + i] = key[i];
  __syncwarp();
  const bool sum_top2 = p.bias != nullptr && size > 1;
  for (int g = lane; g < G; g += 32) {
    uint32_t a = kKeyNone, b = kKeyNone;
    for (int j = 0; j < size; ++j) push_top2(smem[g * size + j], a, b);
    group[g] = group_key(a, b, sum_top2);
  }
  __syncwarp();
  WarpTop<N> top;
#pragma unroll
  for (int i = 0; i < N; ++i) top.key[i] = first + i < G ? group[first + i] : kKeyNone;
  top.scan();
  uint32_t last_key = 0;
  int last = 0;
  for (int r = 0; r < p.topk_group; ++r) last = top.pop(lane, last_key);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = first + i;
    if (e >= E) continue;
    const int g = e / size;
    const uint32_t gk = group[g];
    if (gk < last_key || (gk == last_key && g > last)) key[i] = kKeyMasked;
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kWarps * 32)
    topk_kernel(TopkParams p, int group_mode) {
  extern __shared__ uint32_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t token = int64_t(blockIdx.x) * kWarps + warp;
  if (token >= p.num_tokens) return;  // the whole warp leaves together
  const int E = p.num_experts, K = p.topk, first = lane * N;
  const T* row = static_cast<const T*>(p.logits) + token * E;
  const bool softmax = p.scoring == Scoring::kSoftmax;

  // Scores. The softmax max and sum are kept: a chosen expert's weight is
  // recomputed from its logit with the same operations, so it has the same bits.
  float s[N];
  load_lane<N>(row, first, E, -INFINITY, s);
  float mx = 0.0f, sum = 0.0f;
  if (softmax) {
    mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, s[i]);  // fmaxf skips NaN
    mx = warp_max(mx);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      s[i] = first + i < E ? expf(s[i] - mx) : 0.0f;
      sum += s[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = s[i] / sum;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = sigmoid(s[i]);
  }

  // Selection keys: biased scores; padding past E never wins.
  float bias[N];
  if (p.bias != nullptr) load_lane<N>(p.bias, first, E, 0.0f, bias);
  WarpTop<N> top;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float v = p.bias != nullptr ? s[i] + bias[i] : s[i];
    top.key[i] = first + i < E ? order_key(v) : kKeyNone;
  }
  if (group_mode == kGroupsInLanes) {
    mask_groups_in_lanes<N>(p, lane, top.key);
  } else if (group_mode == kGroupsInSmem) {
    mask_groups_in_smem<N>(p, lane, smem + warp * (E + p.num_groups), top.key);
  }
  top.scan();

  int id = 0;  // lane k keeps the k-th choice
  for (int k = 0; k < K; ++k) {
    uint32_t best;
    const int w = top.pop(lane, best);
    if (lane == k) id = w;
  }

  float weight = 0.0f;
  if (lane < K) {
    const float x = to_float(row[id]);
    weight = softmax ? expf(x - mx) / sum : sigmoid(x);
  }
  // The CPU kernel's formula and summation order: w * (scale / (w_0 + w_1 + ...)).
  float total = 1.0f;
  if (p.renormalize) {
    total = 0.0f;
    for (int k = 0; k < K; ++k) total += __shfl_sync(kFullMask, weight, k);
  }
  const float scale = p.routed_scaling_factor / total;
  if (lane < K) {
    p.ids[token * K + lane] = id;
    p.weights[token * K + lane] = weight * scale;
  }
}

int lane_width(int experts) {
  int n = 1;
  while (n * 32 < experts) n *= 2;
  return n;
}

template <typename T, int N>
void launch(const TopkParams& p, int group_mode, cudaStream_t stream) {
  const size_t smem =
      group_mode == kGroupsInSmem ? size_t(kWarps) * (p.num_experts + p.num_groups) * 4 : 0;
  const int64_t blocks = ceil_div(p.num_tokens, kWarps);
  topk_kernel<T, N><<<grid_size(blocks, "topk"), kWarps * 32, smem, stream>>>(p, group_mode);
  check_launch("topk_kernel");
}

template <typename T>
void launch_width(const TopkParams& p, int group_mode, cudaStream_t stream) {
  switch (lane_width(p.num_experts)) {
    case 1: return launch<T, 1>(p, group_mode, stream);
    case 2: return launch<T, 2>(p, group_mode, stream);
    case 4: return launch<T, 4>(p, group_mode, stream);
    case 8: return launch<T, 8>(p, group_mode, stream);
    case 16: return launch<T, 16>(p, group_mode, stream);
    default: return launch<T, 32>(p, group_mode, stream);
  }
}

void check_params(const TopkParams& p) {
  const int E = p.num_experts;
  if (E < 1 || E > kMaxExperts)
    fail("topk (CUDA): num_experts must be in [1, 1024], got " + std::to_string(E));
  if (p.topk < 1 || p.topk > kMaxTopk || p.topk > E)
    fail("topk (CUDA): topk must be in [1, min(32, num_experts)], got " + std::to_string(p.topk));
  if (p.num_groups < 0 || (p.num_groups > 0 && E % p.num_groups != 0))
    fail("topk (CUDA): num_groups=" + std::to_string(p.num_groups) + " must divide num_experts=" +
         std::to_string(E));
  if (p.num_groups > 0) {
    const int kept = p.topk_group * (E / p.num_groups);
    if (p.topk_group < 1 || p.topk_group > p.num_groups || p.topk > kept)
      fail("topk (CUDA): topk_group=" + std::to_string(p.topk_group) +
           " must be in [1, num_groups] and keep at least topk experts");
  }
}

int group_mode_of(const TopkParams& p) {
  // Keeping every group masks nothing.
  if (p.num_groups == 0 || p.topk_group >= p.num_groups) return kNoGroups;
  const int size = p.num_experts / p.num_groups;
  const bool pow2 = (size & (size - 1)) == 0;
  return pow2 && size >= lane_width(p.num_experts) ? kGroupsInLanes : kGroupsInSmem;
}

}  // namespace

void topk(const TopkParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return;
  check_params(p);
  const int group_mode = group_mode_of(p);
  dispatch_logits(p.logits_dtype, "topk (CUDA)", [&](auto tag) {
    launch_width<typename decltype(tag)::type>(p, group_mode, stream);
  });
}

}  // namespace fused_moe::cuda
