// Top-k routing. Each token is a segment of L lanes of a warp (L = 8 up to
// 256 experts, so one warp routes 32 / L tokens at once); lane j of a segment
// holds the scores of experts [j*N, j*N + N), N = E/L rounded up to a power of
// two, as order-preserving integer keys. Agrees with cpu/routing.cpp: NaN
// ranks below every number, ties go to the lower index, and a selection never
// repeats an expert.
//
// Routing reads little memory and is bound by instruction issue and latency:
// with one token per warp most instructions went to the K argmax rounds and
// their bookkeeping; with several tokens per warp each round serves them all.
// A round is a segment max plus a ballot; then the token's L lanes rescan the
// winner's row together (from shared memory, where a row can be picked at
// run time) for its next best. Its time follows the warps in flight and the
// memory system more than the instruction count (64 registers keep 32 warps
// an SM, about where more stop helping): what a warp keeps through the rounds
// is kept small, expert counts that fill the lanes skip every per-key padding
// test, 4-byte logits reach the lanes through shared memory in contiguous
// 16-byte pieces (each lane loading its own N used half of every sector L1
// fetched, and L1 was the busiest unit), the logits pass through L2
// evict-first, and a chosen weight comes from its key rather than a second
// read of the logits where it can. Measurements: benchmarks/RESULTS.md,
// "Routing kernel".
#include <cmath>

#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopk = 32;
constexpr int kBlockKeys = 8;  // keys per block of a lane's first scan
// Blocks an SM keeps: 64 registers a thread. Latency bound, the kernel needs
// the warps more than the registers (72 of them cost 4 warps an SM;
// benchmarks/RESULTS.md, "Routing kernel").
constexpr int kMinBlocks = 8;

// Words between two lanes' keys in shared memory. N % 4 == 0: N + 4, so a
// lane's row is 16-byte aligned (written and rescanned as whole vectors) and
// the rows of 8 neighbouring lanes start in 8 different 4-bank quads; else
// odd, so the 32 lanes' key i fall in 32 different banks.
template <int N>
constexpr int kLaneStride = N % 4 == 0 ? N + 4 : (N == 1 ? 1 : N + 1);

// Bias index in shared memory: four words of padding per 32, so a lane's N
// (N % 4 == 0) start 16-byte aligned and the 8 lanes of a token, reading
// their experts sub*N + i as vectors, hit 8 different 4-bank quads. For N <= 32
// a power of two, padded(sub*N + i) == padded(sub*N) + i.
__host__ __device__ constexpr int padded(int e) { return e + (e >> 5) * 4; }

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

// The sign decides whether the bits are flipped (negative) or just get the
// top bit (positive). -0 would rank below +0, but no key is made from one:
// scores are >= +0 and adding a bias to +0 rounds to +0 or the bias.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t k = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return f != f ? kKeyNan : k;  // -inf -> 0x007fffff > kKeyNan
}

__device__ __forceinline__ float key_value(uint32_t k) {
  if (k == kKeyNan) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Selection scores: sigmoid from the hardware's exp2 and reciprocal
// approximations (relative error ~2^-21; a few instructions a key instead of
// a dozen: benchmarks/RESULTS.md, "Routing kernel"). A selection
// differs from the exact one only among scores a few ulp apart, as the CPU
// kernel's std::exp against expf already allows. e^-x overflowing gives 0,
// underflowing 1; NaN stays NaN. Biased weights are scored again by sigmoid().
template <int N>
__device__ __forceinline__ void sigmoid_all(float (&s)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float e, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-1.4426950408889634f * s[i]));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
    s[i] = r;
  }
}

// softmax over the token's L lanes of N values each (`real(i)`: value i is
// an expert, not padding); the max and the sum, to score a logit again later.
template <int N, int L, class Real>
__device__ __forceinline__ float2 softmax_all(float (&s)[N], Real real) {
  float mx = -INFINITY, sum = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmaxf(mx, s[i]);  // fmaxf skips NaN
  mx = seg_reduce<L>(mx, [](float x, float y) { return fmaxf(x, y); });
#pragma unroll
  for (int i = 0; i < N; ++i) {
    s[i] = real(i) ? expf(s[i] - mx) : 0.0f;
    sum += s[i];
  }
  sum = seg_reduce<L>(sum, [](float x, float y) { return x + y; });
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = s[i] / sum;
  return make_float2(mx, sum);
}

// Copies n (4 or 16) bytes to shared memory without passing through
// registers; the thread waits for its copies with cp_async_wait_all.
// kStream (16 bytes): data read once (the logits), past L1 and evict-first in L2.
template <int n, bool kStream = false>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  static_assert(!kStream || n == 16, "cp.async.cg copies 16 bytes");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (kStream) {
    asm volatile(
        "{\n .reg .b64 policy;\n createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
        " cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, policy;\n}" ::"r"(dst),
        "l"(gmem)
        : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(gmem), "n"(n) : "memory");
  }
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// The warp's own copy of the bias, experts [0, n) at padded() indices (zeros
// past E), by cp.async: 16-byte pieces where the source allows.
template <int n>
__device__ __forceinline__ void stage_bias(const float* bias, int E, int lane, float* dst) {
  const bool whole = aligned16(bias);
  for (int e = lane * 4; e < n; e += 128) {
    if (whole && e + 4 <= E) {
      cp_async<16>(dst + padded(e), bias + e);
    } else {
#pragma unroll
      for (int q = 0; q < 4 && e + q < n; ++q) {
        if (e + q < E) {
          cp_async<4>(dst + padded(e + q), bias + e + q);
        } else {
          dst[padded(e + q)] = 0.0f;
        }
      }
    }
  }
}

// threadIdx.x and blockIdx.x read anew at every call (volatile): a value
// derived from them is recomputed where used instead of held in a register.
__device__ __forceinline__ int thread_index() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
}

__device__ __forceinline__ int block_index() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  return v;
}

// ---- reductions over the L lanes of one token ------------------------------

// A whole warp has one instruction for it (sm_80 and later, all this builds for).
template <int L>
__device__ __forceinline__ uint32_t seg_max_u32(uint32_t v) {
  if constexpr (L == 32) {
    return __reduce_max_sync(kFullMask, v);
  } else {
    return seg_reduce<L>(v, [](uint32_t x, uint32_t y) { return max(x, y); });
  }
}

// The lowest lane of the segment (0..L-1) holding the segment's largest v,
// which every lane of the segment gets in `best`.
template <int L>
__device__ __forceinline__ int seg_argmax(uint32_t v, int lane, uint32_t& best) {
  best = seg_max_u32<L>(v);
  uint32_t tied = __ballot_sync(kFullMask, v == best);
  if constexpr (L < 32) tied = (tied >> (lane & ~(L - 1))) & ((1u << L) - 1);
  return __ffs(tied) - 1;
}

template <int L>
__device__ __forceinline__ int seg_argmax(uint32_t v, int lane) {
  uint32_t best;
  return seg_argmax<L>(v, lane, best);
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
        const Pack<T, P> v = load_pack<T, P, true>(row + first + j);  // logits: read once
#pragma unroll
        for (int q = 0; q < P; ++q) x[j + q] = to_float(v.e[q]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = first + i < n ? to_float(row[first + i]) : fill;
}

// Keeps (v, at) if v beats `best`: strictly, so among equal keys the first
// one offered (the lowest index, as every scan here ascends) stays.
__device__ __forceinline__ void keep_better(uint32_t v, int at, uint32_t& best, int& where) {
  where = v > best ? at : where;
  best = v > best ? v : best;
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

// ---- one lane's keys in shared memory ---------------------------------------

// v[0..n) to or from a lane's row of keys or biases (4-byte T): whole
// 16-byte accesses when n % 4 == 0, which the layouts above keep aligned.
template <int n, typename T>
__device__ __forceinline__ void store_row(T* row, const T (&v)[n]) {
  if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n; i += 4) {
      uint4 w;
      memcpy(&w, &v[i], sizeof(w));
      reinterpret_cast<uint4*>(row)[i / 4] = w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) row[i] = v[i];
  }
}

template <int n, typename T>
__device__ __forceinline__ void load_row(const T* row, T (&v)[n]) {
  if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n; i += 4) {
      const uint4 w = reinterpret_cast<const uint4*>(row)[i / 4];
      memcpy(&v[i], &w, sizeof(w));
    }
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) v[i] = row[i];
  }
}

// A token's 4-byte logits, every lane's N of them, through the token's rows
// of shared memory: lane `sub` copies the 16-byte pieces sub, sub + L, ... of
// the whole row, so the segment's L lanes read 16L contiguous bytes an
// instruction (each lane loading its own N directly touches L sectors an
// instruction and uses half of each); then each lane reads back its own N.
// Needs E == N * L, N % 4 == 0 and a 16-byte aligned row.
template <int N, int L, typename T>
__device__ __forceinline__ void stage_lane(const T* row, uint32_t* token_rows, int sub, float (&x)[N]) {
  static_assert(sizeof(T) == 4 && N % 4 == 0, "4-byte logits, whole 16-byte pieces a lane");
  constexpr int kPieces = N / 4;  // a lane's 16-byte pieces
#pragma unroll
  for (int i = 0; i < kPieces; ++i) {
    const int piece = i * L + sub;
    cp_async<16, true>(token_rows + piece / kPieces * kLaneStride<N> + piece % kPieces * 4, row + piece * 4);
  }
  cp_async_wait_all();
  __syncwarp();
  load_row<N>(reinterpret_cast<const float*>(token_rows + sub * kLaneStride<N>), x);
}

// This lane's N logits (-inf past E): staged through the token's rows where
// the layout allows (`aligned`: the logits start 16-byte aligned) and it
// paid, else loaded directly. It paid at 32 keys a lane (256 experts and
// up), not at 16 (benchmarks/RESULTS.md, "Routing kernel").
template <int N, int L, bool kPad, typename T>
__device__ __forceinline__ void load_logits(const T* row, bool aligned, uint32_t* token_rows, int sub, int first,
                                            int E, float (&x)[N]) {
  if constexpr (sizeof(T) == 4 && N == 32 && !kPad) {
    if (aligned) return stage_lane<N, L>(row, token_rows, sub, x);  // E == N * L: every row aligned too
  }
  load_lane<N>(row, first, E, -INFINITY, x);
}

// The lane's first scan of its N keys, as blocks of B keys: each block's best
// key and slot, the best of those and the second key (group scores).
// Strict comparisons while slots ascend: equal keys keep the lower slot.
template <int N>
struct LaneTop {
  static constexpr int B = N < kBlockKeys ? N : kBlockKeys;
  static constexpr int kBlocks = N / B;
  uint32_t block_best[kBlocks];
  int block_slot[kBlocks];
  uint32_t best;
  int slot;

  __device__ __forceinline__ void init(const uint32_t (&key)[N]) {
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      block_best[b] = key[b * B];
      block_slot[b] = b * B;
#pragma unroll
      for (int j = 1; j < B; ++j) keep_better(key[b * B + j], b * B + j, block_best[b], block_slot[b]);
    }
    pick();
  }

  __device__ __forceinline__ void pick() {
    best = block_best[0];
    slot = block_slot[0];
#pragma unroll
    for (int b = 1; b < kBlocks; ++b) keep_better(block_best[b], block_slot[b], best, slot);
  }

  // The lane's second key (of the multiset: a tie with the best counts): the
  // best of the other blocks or of the rest of the best's block.
  __device__ __forceinline__ uint32_t second(const uint32_t* keys) const {
    const int first = slot & ~(B - 1);
    uint32_t k[B];
    load_row<B>(keys + first, k);
    uint32_t r = kKeyNone;
#pragma unroll
    for (int j = 0; j < B; ++j) r = first + j == slot ? r : max(r, k[j]);
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) r = b == first / B ? r : max(r, block_best[b]);
    return r;
  }
};

// After a round took key `taken` of lane `winner`'s row, the L lanes of the
// token rescan that row together, R = N / L keys each (16 bytes for N = 32,
// L = 8), and a segment argmax gives its new best and slot: every lane works,
// where one lane rescanning alone left 7 of 8 idle and kept each block's best
// in registers.
template <int N, int L>
__device__ __forceinline__ void take_and_rescan(uint32_t* row, int taken, int winner, int sub, int lane,
                                                uint32_t& best, int& slot) {
  constexpr int R = N / L > 0 ? N / L : 1;
  __syncwarp();  // the last round's reads of this row come first
  if (sub == winner) row[taken] = kKeyNone;
  __syncwarp();
  uint32_t b = kKeyNone;
  int s = 0;
  if (sub * R < N) {
    uint32_t k[R];
    load_row<R>(row + sub * R, k);
    b = k[0];
    s = sub * R;
#pragma unroll
    for (int j = 1; j < R; ++j) keep_better(k[j], sub * R + j, b, s);
  }
  uint32_t row_best;
  const int owner = seg_argmax<L>(b, lane, row_best);
  const int row_slot = __shfl_sync(kFullMask, s, owner, L);
  if (sub == winner) best = row_best, slot = row_slot;
}

// The token's K choices, one a round: choice k goes to lane k % L of the
// segment, in its slot k / L, with its key's value as its weight. `best` and
// `slot`: the lane's best key and where it is in its row; `rows`: the
// token's L rows of keys.
template <int N, int L, int kChoices>
__device__ __forceinline__ void take_topk(uint32_t* rows, uint32_t best, int slot, int K, int sub, int lane,
                                          int (&id)[kChoices], float (&weight)[kChoices]) {
#pragma unroll
  for (int c = 0; c < kChoices; ++c) {
    for (int j = 0; j < L && c * L + j < K; ++j) {
      uint32_t chosen;
      const int winner = seg_argmax<L>(best, lane, chosen);
      const int taken = __shfl_sync(kFullMask, slot, winner, L);
      if (sub == j) {
        id[c] = winner * N + taken;
        weight[c] = key_value(chosen);
      }
      take_and_rescan<N, L>(rows + winner * kLaneStride<N>, taken, winner, sub, lane, best, slot);
    }
  }
}

// Stores w * (scale / the sum of the chosen w) and the ids, for a valid
// token (`token()`, read where used). Each lane adds its own choices, then a
// butterfly over the token's lanes, with no loop bounded by K (the CPU kernel
// adds w_0 + w_1 + ... in order: the sums may differ in the last bit).
template <int L, int kChoices, class Token>
__device__ __forceinline__ void store_choices(const TopkParams& p, Token token, int sub,
                                              const int (&id)[kChoices], const float (&weight)[kChoices]) {
  const int K = p.topk;
  float total = 1.0f;
  if (p.renormalize) {
    total = 0.0f;
#pragma unroll
    for (int c = 0; c < kChoices; ++c) total += c * L + sub < K ? weight[c] : 0.0f;
    total = seg_reduce<L>(total, [](float x, float y) { return x + y; });
  }
  const float scale = p.routed_scaling_factor / total;
  if (token() >= p.num_tokens) return;
#pragma unroll
  for (int c = 0; c < kChoices; ++c) {
    const int k = c * L + sub;
    if (k < K) {
      p.ids[token() * K + k] = id[c];
      p.weights[token() * K + k] = weight[c] * scale;
    }
  }
}

// ---- grouped top-k ---------------------------------------------------------

struct GroupInfo {
  int mode = kNoGroups;
  int size = 1;        // experts per group
  int lane_shift = 0;  // kGroupsInLanes: log2(lanes per group)
  bool sum_top2 = false;
};

// Group size a power of two >= N: group g is the lanes g << lane_shift
// onward. The lanes' top two merge by butterflies into the group's top two,
// and each group counts the groups that beat it; a dropped group's lanes get
// `best` = kKeyMasked.
template <int N, int L>
__device__ void mask_groups_in_lanes(const TopkParams& p, const GroupInfo& g, int sub, uint32_t a,
                                     uint32_t b, uint32_t& best) {
  for (int o = 1; o < (1 << g.lane_shift); o <<= 1) {
    const uint32_t a2 = __shfl_xor_sync(kFullMask, a, o, L);
    const uint32_t b2 = __shfl_xor_sync(kFullMask, b, o, L);
    b = max(min(a, a2), max(b, b2));
    a = max(a, a2);
  }
  const bool real = sub * N < p.num_experts;  // lanes past E hold no group
  const uint32_t cand = real ? group_key(a, b, g.sum_top2) : kKeyNone;
  // A group is kept if fewer than topk_group others beat it (ties: the lower
  // group). Lane sub ^ o, o a multiple of the lanes a group spans, is in
  // another group, each once: independent shuffles rather than topk_group
  // argmax rounds one after another.
  const int group = sub >> g.lane_shift;
  int rank = 0;
#pragma unroll
  for (int o = 1; o < L; ++o) {
    if ((o >> g.lane_shift) << g.lane_shift != o) continue;
    const uint32_t other = __shfl_xor_sync(kFullMask, cand, o, L);
    rank += other > cand || (other == cand && ((sub ^ o) >> g.lane_shift) < group);
  }
  if (real && rank >= p.topk_group) best = kKeyMasked;  // the lane never wins again
}

// Any group size: `keys` holds the token's keys, lane by lane (kLaneStride
// apart). Group scores go to smem (G keys, then G kept flags); lane j owns a
// contiguous run of groups, so lane order is group order, and the kept groups
// are chosen one per round by a segment argmax over each lane's best
// remaining group.
template <int N, int L>
__device__ void mask_groups_in_smem(const TopkParams& p, const GroupInfo& g, int lane, int sub,
                                    const uint32_t* keys, uint32_t* smem, uint32_t (&key)[N]) {
  const int E = p.num_experts, G = p.num_groups;
  uint32_t* group = smem;
  uint32_t* kept = smem + G;
  for (int q = sub; q < G; q += L) {
    uint32_t a = kKeyNone, b = kKeyNone;
    for (int j = 0; j < g.size; ++j) {
      const int e = q * g.size + j;
      push_top2(keys[e / N * kLaneStride<N> + e % N], a, b);
    }
    group[q] = group_key(a, b, g.sum_top2);
    kept[q] = 0;
  }
  __syncwarp();
  const int per_lane = (G + L - 1) / L, begin = min(G, sub * per_lane),
            end = min(G, begin + per_lane);
  for (int r = 0; r < p.topk_group; ++r) {
    uint32_t best = kKeyNone;
    int best_group = begin;
    for (int q = begin; q < end; ++q) keep_better(kept[q] ? kKeyNone : group[q], q, best, best_group);
    const int winner = seg_argmax<L>(best, lane);
    if (sub == winner) kept[best_group] = 1;
    __syncwarp();
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = sub * N + i;
    if (e < E && !kept[e / g.size]) key[i] = kKeyMasked;
  }
}

// ---- the kernel ------------------------------------------------------------

// The kernel's static shared memory (the host sizes its launch by it).
template <int N, int L>
struct StaticSmem {
  alignas(16) uint32_t keys[kWarps][32][kLaneStride<N>];  // each lane's row
  alignas(16) float bias[kWarps][padded(L * N)];           // each warp's copy
  float2 softmax[kWarps][32 / L];                          // a token's max and sum
};

// kPad: E < L * N, so the last lanes hold padding past E that must never win.
template <typename T, int N, int L, bool kPad>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    topk_kernel(TopkParams p, GroupInfo g) {
  constexpr int kTokensPerWarp = 32 / L;
  constexpr int kChoices = (kMaxTopk + L - 1) / L;  // choices a lane may hold
  __shared__ StaticSmem<N, L> shared;
  auto& key_smem = shared.keys;
  auto& bias_smem = shared.bias;
  auto& softmax_smem = shared.softmax;
  extern __shared__ uint32_t group_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane & (L - 1);
  const int E = p.num_experts, K = p.topk, first = sub * N;
  // The warp's first token, and this lane's (a valid token or, past the end,
  // the first one's row: computed on, never stored). Read again where used
  // rather than held in registers through the rounds.
  auto first_token = [] { return (int64_t(block_index()) * kWarps + (thread_index() >> 5)) * kTokensPerWarp; };
  auto token = [&] { return first_token() + (thread_index() & 31) / L; };
  auto row_token = [&] { return token() < p.num_tokens ? token() : first_token(); };
  auto logits_row = [&] { return static_cast<const T*>(p.logits) + row_token() * E; };
  const bool active = first_token() < p.num_tokens;  // per warp
  const bool softmax = p.scoring == Scoring::kSoftmax;
  auto real = [&](int i) { return !kPad || first + i < E; };  // key i of this lane is an expert

  if (!active) return;  // the whole warp leaves together
  // Every token adds the same bias: each warp copies it to shared memory by
  // cp.async, ahead of its logits and waited for only when the scores are
  // done, so no warp waits on another's loads or holds the bias in registers.
  const bool bias = p.bias != nullptr;
  if (bias) stage_bias<L * N>(p.bias, E, lane, bias_smem[warp]);
  float s[N];
  load_logits<N, L, kPad>(logits_row(), aligned16(p.logits), key_smem[warp][lane & ~(L - 1)], sub, first, E, s);
  if (softmax) {
    const float2 norm = softmax_all<N, L>(s, real);
    if (bias && sub == 0) softmax_smem[warp][lane / L] = norm;  // to score chosen logits again
  } else {
    sigmoid_all<N>(s);
  }

  // Selection keys: biased scores; padding past E never wins.
  if (bias) {
    cp_async_wait_all();
    __syncwarp();
    float b[N];
    load_row<N>(bias_smem[warp] + padded(first), b);
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] += b[i];
  }
  uint32_t key[N];
#pragma unroll
  for (int i = 0; i < N; ++i) key[i] = real(i) ? order_key(s[i]) : kKeyNone;

  uint32_t* keys = key_smem[warp][lane];  // this lane's N
  if (g.mode == kGroupsInSmem) {
    store_row<N>(keys, key);
    __syncwarp();
    uint32_t* smem = group_smem + (warp * kTokensPerWarp + lane / L) * 2 * p.num_groups;
    mask_groups_in_smem<N, L>(p, g, lane, sub, key_smem[warp][lane & ~(L - 1)], smem, key);
    __syncwarp();
  }
  store_row<N>(keys, key);
  LaneTop<N> top;
  top.init(key);
  if (g.mode == kGroupsInLanes) mask_groups_in_lanes<N, L>(p, g, sub, top.best, top.second(keys), top.best);

  // A weight is the chosen expert's score: without a bias, its key's value
  // (the same bits); with one, its logit scored again with the same operations.
  int id[kChoices] = {};
  float weight[kChoices] = {};
  take_topk<N, L>(key_smem[warp][lane & ~(L - 1)], top.best, top.slot, K, sub, lane, id, weight);
  if (bias) {
    __syncwarp();  // the token's softmax_smem entry was written by its first lane
    const T* row = logits_row();
    const float2 norm = softmax ? softmax_smem[warp][lane / L] : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int c = 0; c < kChoices; ++c) {
      if (c * L + sub < K) {
        const float x = to_float(row[id[c]]);
        weight[c] = softmax ? expf(x - norm.x) / norm.y : sigmoid(x);
      }
    }
  }
  store_choices<L>(p, token, sub, id, weight);
}

// ---- host side -------------------------------------------------------------

int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// How the groups are masked when each lane holds n keys.
GroupInfo group_info(const TopkParams& p, int n) {
  GroupInfo g;
  // Keeping every group masks nothing.
  if (p.num_groups == 0 || p.topk_group >= p.num_groups) return g;
  g.size = p.num_experts / p.num_groups;
  g.sum_top2 = p.bias != nullptr && g.size > 1;
  if ((g.size & (g.size - 1)) == 0 && g.size >= n) {
    g.mode = kGroupsInLanes;
    while ((n << g.lane_shift) < g.size) ++g.lane_shift;
  } else {
    g.mode = kGroupsInSmem;
  }
  return g;
}

template <typename T, int N, int L, bool kPad>
void launch_kernel(const TopkParams& p, cudaStream_t stream) {
  constexpr int tokens_per_block = kWarps * (32 / L);
  const GroupInfo g = group_info(p, N);
  const size_t smem =
      g.mode == kGroupsInSmem ? size_t(tokens_per_block) * 2 * p.num_groups * sizeof(uint32_t) : 0;
  // Past 48 KiB with the static arrays (many tiny groups, e.g. 512 groups of
  // one expert) the kernel must opt in to more shared memory.
  if (smem + sizeof(StaticSmem<N, L>) > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(topk_kernel<T, N, L, kPad>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "topk (CUDA): shared memory for the group scores");
  }
  const int64_t blocks = ceil_div(p.num_tokens, tokens_per_block);
  topk_kernel<T, N, L, kPad><<<grid_size(blocks, "topk"), kWarps * 32, smem, stream>>>(p, g);
  check_launch("topk_kernel");
}

template <typename T, int N, int L>
void launch(const TopkParams& p, cudaStream_t stream) {
  if (p.num_experts == N * L) return launch_kernel<T, N, L, false>(p, stream);
  launch_kernel<T, N, L, true>(p, stream);
}

// Keys per lane N and lanes per token L: 8 lanes up to 256 experts (four
// tokens a warp), then as many as keep each lane at 32 keys.
template <typename T>
void launch_shape(const TopkParams& p, cudaStream_t stream) {
  switch (pow2_at_least(p.num_experts)) {
    case 1:
    case 2:
    case 4:
    case 8: return launch<T, 1, 8>(p, stream);
    case 16: return launch<T, 2, 8>(p, stream);
    case 32: return launch<T, 4, 8>(p, stream);
    case 64: return launch<T, 8, 8>(p, stream);
    case 128: return launch<T, 16, 8>(p, stream);
    case 256: return launch<T, 32, 8>(p, stream);
    case 512: return launch<T, 32, 16>(p, stream);
    default: return launch<T, 32, 32>(p, stream);
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

}  // namespace

void topk(const TopkParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return;
  check_params(p);
  dispatch_logits(p.logits_dtype, "topk (CUDA)", [&](auto tag) {
    launch_shape<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace fused_moe::cuda
