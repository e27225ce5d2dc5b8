// Token permutation: gather token rows into expert order (permute) and the
// weighted top-k sum back into token order (unpermute).
//
// Permute sorts the slots s = t*K + k by (bin, s), where a slot's bin is its
// local expert, or E_local for every slot not computed here (those take the
// zero rows at the end of `out`). Three launches (two when one chunk holds
// every slot), no atomics in the results:
//   count_ranks: one warp per chunk of slots, in slot order: each slot's rank
//                among the chunk's slots of its bin, and the chunk's bin counts
//                (with a single chunk, also the expert offsets);
//   scan_counts: one block per bin scans its counts over the chunks; the last
//                block to finish scans the bin totals into expert_offsets;
//   scatter:     one warp per (token, slice of the row): destination rows of
//                the token's K slots, inv_index, and the row copies.
#include <algorithm>

#include "cuda/common.cuh"

namespace fused_moe::cuda {
namespace {

constexpr int kCountWarps = 4;   // chunks per block in count_ranks
constexpr int kCountBatch = 8;   // 32-slot steps whose ids are loaded together
constexpr int kScanThreads = 256;
constexpr int kScanItems = 4;    // consecutive items per thread in a scan tile
constexpr int kCopyWarps = 8;
// Packs per lane held while writing the K copies; the weighted copy keeps
// them as floats too, so it holds fewer within the 64-register budget.
template <bool Weighted>
constexpr int kCopyUnroll = Weighted ? 4 : 8;
constexpr int kSumWarps = 8;
constexpr int kSumUnroll = 4;    // packs per lane accumulated at once by unpermute
constexpr size_t kSmemLimit = 48 * 1024;

// Where everything lives in the workspace; the same function sizes it.
struct Layout {
  int64_t slots = 0;
  int bins = 0;          // E_local + 1: the last bin holds the non-local slots
  int chunk = 0;         // slots per count_ranks warp, a multiple of 32
  int64_t chunks = 0;
  int count_warps = 0;   // warps per count_ranks block: (bins) ints of smem each
  size_t ranks = 0;      // int32 [slots]: rank of each slot in its (chunk, bin)
  size_t counts = 0;     // int32 [bins][chunks]: counts, then their scan over chunks
  size_t totals = 0;     // int32 [bins]
  size_t done = 0;       // uint32: scan_counts blocks finished
  size_t bytes = 0;
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

Layout make_layout(const PermuteParams& p) {
  Layout l;
  l.slots = p.num_tokens * p.topk;
  l.bins = p.num_local_experts + 1;
  // At least two slots per bin and chunk keeps the count table under half the
  // slots, whatever E_local.
  l.chunk = static_cast<int>(ceil_div(std::max<int64_t>(256, 2 * int64_t(l.bins)), 32) * 32);
  l.chunks = ceil_div(l.slots, l.chunk);
  const size_t hist_bytes = size_t(l.bins) * sizeof(int32_t);
  l.count_warps = static_cast<int>(std::min<size_t>(kCountWarps, kSmemLimit / hist_bytes));
  l.ranks = 0;
  l.counts = align256(l.slots * sizeof(int32_t));
  l.totals = l.counts + align256(size_t(l.bins) * l.chunks * sizeof(int32_t));
  l.done = l.totals + align256(hist_bytes);
  l.bytes = l.done + 256;
  return l;
}

// The bins of N expert ids, in place: a bin is the local expert, or
// num_local_experts when the id is out of range or its expert lives on another
// rank.
template <int N>
__device__ __forceinline__ void bins_of(const PermuteParams& p, int (&v)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int e = local_expert(v[j], p.expert_map, p.num_experts, p.num_local_experts);
    v[j] = e < 0 ? p.num_local_experts : e;
  }
}

// Inclusive prefix sum over the warp's lanes.
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

__global__ void count_ranks_kernel(PermuteParams p, Layout l, int32_t* ranks, int32_t* counts,
                                   uint32_t* done) {
  extern __shared__ int32_t hist_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (blockIdx.x == 0 && threadIdx.x == 0) *done = 0;  // scan_counts runs after this kernel
  const int64_t chunk = int64_t(blockIdx.x) * l.count_warps + warp;
  if (chunk >= l.chunks) return;  // whole warp
  int32_t* hist = hist_smem + warp * l.bins;
  for (int b = lane; b < l.bins; b += 32) hist[b] = 0;
  __syncwarp();

  const int64_t begin = chunk * l.chunk, end = std::min(begin + l.chunk, l.slots);
  const unsigned lower_lanes = (1u << lane) - 1;
  for (int64_t base = begin; base < end; base += 32 * kCountBatch) {
    // All ids first, then all map lookups: two round trips per batch.
    int bin[kCountBatch];
#pragma unroll
    for (int j = 0; j < kCountBatch; ++j) {
      const int64_t s = base + j * 32 + lane;
      bin[j] = s < end ? p.topk_ids[s] : -1;
    }
    bins_of(p, bin);
#pragma unroll
    for (int j = 0; j < kCountBatch; ++j)  // -1 past the end: such lanes only match each other
      if (base + j * 32 + lane >= end) bin[j] = -1;
#pragma unroll
    for (int j = 0; j < kCountBatch; ++j) {
      // Lanes of one bin in one step rank by lane, after all earlier steps: slot order.
      const unsigned peers = __match_any_sync(kFullMask, bin[j]);
      const int before = __popc(peers & lower_lanes);
      const int start = bin[j] >= 0 ? hist[bin[j]] : 0;
      __syncwarp();
      if (bin[j] >= 0) {
        if (before == 0) hist[bin[j]] = start + __popc(peers);
        ranks[base + j * 32 + lane] = start + before;
      }
      __syncwarp();
    }
  }
  if (l.chunks > 1) {
    for (int b = lane; b < l.bins; b += 32) counts[b * l.chunks + chunk] = hist[b];
    return;
  }
  // The only chunk (decode-sized batches): its counts are the bin totals, so
  // this warp scans them into expert_offsets and scan_counts is not launched.
  int carry = 0;
  for (int b0 = 0; b0 < l.bins; b0 += 32) {
    const int b = b0 + lane;
    const int v = b < l.bins ? hist[b] : 0;
    const int inclusive = warp_inclusive_scan(v, lane);
    if (b < l.bins) {
      p.expert_offsets[b] = carry + inclusive - v;
      counts[b] = 0;  // the exclusive scan over one chunk
    }
    carry += __shfl_sync(kFullMask, inclusive, 31);
  }
}

// Exclusive scan of in[0, n) into out (may alias) by the whole block; every
// thread gets the total. Reads bypass L1: `in` may be written by other blocks.
__device__ int block_exclusive_scan(const int32_t* in, int32_t* out, int64_t n) {
  __shared__ int warp_sums[kScanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int carry = 0;
  for (int64_t tile = 0; tile < n; tile += kScanThreads * kScanItems) {
    const int64_t first = tile + int64_t(threadIdx.x) * kScanItems;
    int v[kScanItems], sum = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      v[j] = first + j < n ? __ldcg(in + first + j) : 0;
      sum += v[j];
    }
    const int inclusive = warp_inclusive_scan(sum, lane);
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    int before = carry, tile_sum = 0;
#pragma unroll
    for (int w = 0; w < kScanThreads / 32; ++w) {
      if (w < warp) before += warp_sums[w];
      tile_sum += warp_sums[w];
    }
    int run = before + inclusive - sum;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (first + j < n) out[first + j] = run;
      run += v[j];
    }
    carry += tile_sum;
    __syncthreads();  // warp_sums is reused by the next tile
  }
  return carry;
}

__global__ void __launch_bounds__(kScanThreads)
    scan_counts_kernel(Layout l, int32_t* counts, int32_t* totals, uint32_t* done,
                       int32_t* expert_offsets) {
  __shared__ bool last;
  int32_t* column = counts + int64_t(blockIdx.x) * l.chunks;
  const int total = block_exclusive_scan(column, column, l.chunks);
  if (threadIdx.x == 0) {
    totals[blockIdx.x] = total;
    __threadfence();  // the total is visible before this block counts as done
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  block_exclusive_scan(totals, expert_offsets, l.bins);  // offsets[E_local] = local slots
}

template <typename T, int P>
__device__ __forceinline__ Pack<T, P> scaled(Pack<T, P> v, float w) {
#pragma unroll
  for (int q = 0; q < P; ++q) v.e[q] = from_float<T>(to_float(v.e[q]) * w);
  return v;
}

// Writes one slice of a token row (v, held by the warp) to the rows of up to
// 32 slots; lane j holds slot j's destination row, whether it is local (else
// the row is zeroed) and its weight.
template <bool Weighted, typename T, int P>
__device__ __forceinline__ void write_copies(T* out, int64_t hidden, int64_t col, int64_t packs,
                                             const Pack<T, P> (&v)[kCopyUnroll<Weighted>],
                                             int slots, int dest, bool local, float weight,
                                             int lane) {
  for (int j = 0; j < slots; ++j) {
    const int64_t row = __shfl_sync(kFullMask, dest, j);
    const bool loc = __shfl_sync(kFullMask, local, j);
    const float w = __shfl_sync(kFullMask, weight, j);
    T* dst = out + row * hidden;
#pragma unroll
    for (int u = 0; u < kCopyUnroll<Weighted>; ++u) {
      const int64_t i = col + u * 32 + lane;
      if (i >= packs) continue;
      if (!loc) {
        store_pack<T, P>(dst + i * P, Pack<T, P>{});
      } else if constexpr (Weighted) {
        store_pack<T, P>(dst + i * P, scaled(v[u], w));
      } else {
        store_pack<T, P>(dst + i * P, v[u]);
      }
    }
  }
}

// At most 64 registers (4 blocks per SM): enough copies in flight to fill HBM.
template <bool Weighted, typename T, int P>
__global__ void __launch_bounds__(kCopyWarps * 32, 4)
    scatter_kernel(PermuteParams p, Layout l, const int32_t* ranks, const int32_t* counts,
                   int64_t slices) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = int64_t(blockIdx.x) * kCopyWarps + warp;
  const int64_t token = task / slices, slice = task - token * slices;
  if (token >= p.num_tokens) return;  // whole warp
  const int K = p.topk;
  const int64_t H = p.hidden, packs = H / P, col = slice * 32 * kCopyUnroll<Weighted>;

  // The slice is read once, first: its loads overlap the index lookups below.
  const T* src = static_cast<const T*>(p.x) + token * p.x_stride;
  Pack<T, P> v[kCopyUnroll<Weighted>] = {};
#pragma unroll
  for (int u = 0; u < kCopyUnroll<Weighted>; ++u) {
    const int64_t i = col + u * 32 + lane;
    if (i < packs) v[u] = load_pack<T, P>(src + i * P);
  }

  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    int dest = 0;
    bool local = false;
    float weight = 1.0f;
    if (k < K) {
      const int64_t s = token * K + k;
      int bin[1] = {p.topk_ids[s]};
      bins_of(p, bin);
      dest = p.expert_offsets[bin[0]] + counts[bin[0] * l.chunks + s / l.chunk] + ranks[s];
      local = bin[0] < p.num_local_experts;
      if (Weighted) weight = p.row_weights[s];
      if (slice == 0) p.inv_index[s] = local ? dest : -1;
    }
    write_copies<Weighted>(static_cast<T*>(p.out), H, col, packs, v, std::min(32, K - k0), dest,
                           local, weight, lane);
  }
}

// out[t] over one slice of the row: sum over k of w[t,k] * y[inv[t,k]], in the
// order of k, with separate fp32 multiply and add (as the CPU kernel rounds).
template <typename T, int P>
__global__ void __launch_bounds__(kSumWarps * 32)
    unpermute_kernel(UnpermuteParams p, int64_t slices) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = int64_t(blockIdx.x) * kSumWarps + warp;
  const int64_t token = task / slices, slice = task - token * slices;
  if (token >= p.num_tokens) return;  // whole warp
  const int K = p.topk;
  const int64_t H = p.hidden, packs = H / P, col = slice * 32 * kSumUnroll;
  const T* y = static_cast<const T*>(p.y);
  float acc[kSumUnroll][P] = {};
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    int row = -1;
    float weight = 1.0f;
    if (k < K) {
      row = p.inv_index[token * K + k];
      if (row >= p.rows) row = -1;  // unchecked on the GPU: never read past y
      if (p.weights != nullptr) weight = p.weights[token * K + k];
    }
    const int n = std::min(32, K - k0);
    for (int j = 0; j < n; ++j) {
      const int r = __shfl_sync(kFullMask, row, j);
      const float w = __shfl_sync(kFullMask, weight, j);
      if (r < 0) continue;  // warp-uniform
      const T* src = y + int64_t(r) * p.y_stride;
      Pack<T, P> v[kSumUnroll] = {};  // all loads issued before the first use
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
        const int64_t i = col + u * 32 + lane;
        if (i < packs) v[u] = load_pack<T, P>(src + i * P);
      }
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
#pragma unroll
        for (int q = 0; q < P; ++q)
          acc[u][q] = __fadd_rn(acc[u][q], __fmul_rn(w, to_float(v[u].e[q])));
      }
    }
  }
  T* dst = static_cast<T*>(p.out) + token * H;
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
    const int64_t i = col + u * 32 + lane;
    if (i >= packs) continue;
    Pack<T, P> v;
#pragma unroll
    for (int q = 0; q < P; ++q) v.e[q] = from_float<T>(acc[u][q]);
    store_pack<T, P>(dst + i * P, v);
  }
}

// Rows move as 16-byte packs when the row length and both base pointers allow.
template <typename T>
bool rows_vectorizable(int64_t hidden, const void* a, const void* b) {
  return (hidden * int64_t(sizeof(T))) % 16 == 0 && aligned16(a) && aligned16(b);
}

// Warps per token row: slices of `per_warp` packs, at least one (the inv_index
// writes happen even when H = 0).
int64_t row_slices(int64_t packs, int64_t per_warp) {
  return std::max<int64_t>(1, ceil_div(packs, per_warp));
}

template <bool Weighted, typename T, int P>
void launch_scatter(const PermuteParams& p, const Layout& l, const int32_t* ranks,
                    const int32_t* counts, cudaStream_t stream) {
  const int64_t slices = row_slices(p.hidden / P, 32 * kCopyUnroll<Weighted>);
  const unsigned blocks = grid_size(ceil_div(p.num_tokens * slices, kCopyWarps), "permute");
  scatter_kernel<Weighted, T, P><<<blocks, kCopyWarps * 32, 0, stream>>>(p, l, ranks, counts,
                                                                         slices);
  check_launch("permute scatter_kernel");
}

template <typename T, int P>
void launch_scatter(const PermuteParams& p, const Layout& l, const int32_t* ranks,
                    const int32_t* counts, cudaStream_t stream) {
  if (p.row_weights != nullptr) {
    launch_scatter<true, T, P>(p, l, ranks, counts, stream);
  } else {
    launch_scatter<false, T, P>(p, l, ranks, counts, stream);
  }
}

template <typename T, int P>
void launch_unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  const int64_t slices = row_slices(p.hidden / P, 32 * kSumUnroll);
  const int64_t blocks = ceil_div(p.num_tokens * slices, kSumWarps);
  unpermute_kernel<T, P><<<grid_size(blocks, "unpermute"), kSumWarps * 32, 0, stream>>>(p, slices);
  check_launch("unpermute_kernel");
}

void check_permute(const PermuteParams& p, const Layout& l) {
  if (p.num_tokens < 0 || p.topk < 0 || p.hidden < 0 || p.num_local_experts < 0)
    fail("permute (CUDA): negative size");
  if (l.slots > INT32_MAX)
    fail("permute (CUDA): num_tokens * topk = " + std::to_string(l.slots) +
         " exceeds the int32 range of inv_index");
  if (l.count_warps < 1)
    fail("permute (CUDA): num_local_experts = " + std::to_string(p.num_local_experts) +
         " is too large (at most " + std::to_string(kSmemLimit / 4 - 1) + ")");
}

}  // namespace

size_t permute_workspace_bytes(const PermuteParams& p) {
  const Layout l = make_layout(p);
  // Nothing for sizes permute() rejects, so its message comes before any allocation failure.
  return l.slots > 0 && l.slots <= INT32_MAX && l.count_warps > 0 ? l.bytes : 0;
}

void permute(const PermuteParams& p, void* workspace, cudaStream_t stream) {
  const Layout l = make_layout(p);
  check_permute(p, l);
  if (l.slots == 0) {  // no kernel: only the offsets have entries, all zero
    check_cuda(cudaMemsetAsync(p.expert_offsets, 0, size_t(l.bins) * sizeof(int32_t), stream),
               "permute (CUDA): zeroing expert_offsets");
    return;
  }
  if (workspace == nullptr) fail("permute (CUDA): workspace is null");
  char* ws = static_cast<char*>(workspace);
  auto* ranks = reinterpret_cast<int32_t*>(ws + l.ranks);
  auto* counts = reinterpret_cast<int32_t*>(ws + l.counts);
  auto* totals = reinterpret_cast<int32_t*>(ws + l.totals);
  auto* done = reinterpret_cast<uint32_t*>(ws + l.done);

  const int64_t count_blocks = ceil_div(l.chunks, l.count_warps);
  const size_t hist_smem = size_t(l.count_warps) * l.bins * sizeof(int32_t);
  count_ranks_kernel<<<grid_size(count_blocks, "permute"), l.count_warps * 32, hist_smem,
                       stream>>>(p, l, ranks, counts, done);
  check_launch("permute count_ranks_kernel");

  if (l.chunks > 1) {
    scan_counts_kernel<<<l.bins, kScanThreads, 0, stream>>>(l, counts, totals, done,
                                                            p.expert_offsets);
    check_launch("permute scan_counts_kernel");
  }

  dispatch_float(p.dtype, "permute (CUDA)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows_vectorizable<T>(p.hidden, p.x, p.out) &&
        (p.x_stride * int64_t(sizeof(T))) % 16 == 0) {
      launch_scatter<T, kVec<T>>(p, l, ranks, counts, stream);
    } else {
      launch_scatter<T, 1>(p, l, ranks, counts, stream);
    }
  });
}

void unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.hidden <= 0) return;
  if (p.topk < 0) fail("unpermute (CUDA): negative topk");
  dispatch_float(p.dtype, "unpermute (CUDA)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows_vectorizable<T>(p.hidden, p.y, p.out) &&
        (p.y_stride * int64_t(sizeof(T))) % 16 == 0) {
      launch_unpermute<T, kVec<T>>(p, stream);
    } else {
      launch_unpermute<T, 1>(p, stream);
    }
  });
}

}  // namespace fused_moe::cuda
