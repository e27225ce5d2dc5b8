// What the decode kernels share (decode.cu: 16-bit and fp32 weights;
// decode_fp8.cu: e4m3 weights): the block shape, programmatic dependent
// launch, the chain's rounding of GEMM outputs, the launch itself and the
// grid sizing.
#pragma once

#include <algorithm>

#include "cuda/common.cuh"

namespace fused_moe::cuda::decode_detail {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDefaultSmem = 48 * 1024;  // more needs the kernel's opt-in

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 raw;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(p));
  return raw;
}

// Programmatic dependent launch (sm_90): down_kernel is launched while
// up_kernel still runs, and waits for it only where it reads act.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ float bias_of(const void* bias, int64_t i) {
  return bias ? to_float(static_cast<const T*>(bias)[i]) : 0.0f;
}

// A GEMM output as the chain stores it: acc + bias rounded to T.
template <typename T>
__device__ __forceinline__ float rounded(float acc, const void* bias, int64_t i) {
  return to_float(from_float<T>(acc + bias_of<T>(bias, i)));
}

// Token t's top-k slots as a warp of a down kernel holds them: lane k < K
// has slot k's local expert (-1: another rank's) and router weight (1 when
// it scaled the input instead); `local` has bit k set for local slots, and
// lane i < slots holds `ranked`, the i-th of them.
struct TokenSlots {
  int e = -1;
  float weight = 1.0f;
  unsigned local = 0;
  int slots = 0;
  int ranked = 0;
};

__device__ __forceinline__ TokenSlots token_slots(const DecodeParams& p, int64_t t, int lane) {
  TokenSlots s;
  const int K = p.topk;
  if (lane < K) {
    s.e = local_expert(p.topk_ids[t * K + lane], p.expert_map, p.num_experts, p.num_local_experts);
    if (!p.weight_on_input) s.weight = p.topk_weights[t * K + lane];
  }
  s.local = __ballot_sync(kFullMask, s.e >= 0);
  s.slots = __popc(s.local);
  s.ranked = lane < s.slots ? __fns(s.local, 0, lane + 1) : 0;
  return s;
}

// Steps [0, steps) through two stages: step + 1 loads into one (load(stage,
// step)) while step multiplies out of the other (consume(stage, step)); the
// caller has loaded step 0 into a.
template <typename Stage, typename Load, typename Consume>
__device__ __forceinline__ void two_stages(int steps, Stage& a, Stage& b, Load load,
                                           Consume consume) {
  for (int step = 0; step < steps; step += 2) {
    if (step + 1 < steps) load(b, step + 1);
    consume(a, step);
    if (step + 1 >= steps) break;
    if (step + 2 < steps) load(a, step + 2);
    consume(b, step + 1);
  }
}

// Launches `kernel` with `smem` bytes of dynamic shared memory, opting in
// past the default 48 KiB.
template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const DecodeParams& p, int per_warp,
            bool overlap_prior, cudaStream_t stream, const char* name) {
  if (smem > kDefaultSmem) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)), name);
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = overlap_prior ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, p, per_warp), name);
}

// Jobs per warp so that the grid is about one wave of resident blocks: every
// block then pays its prologue (ids, staging) once, and no second, partial
// wave runs at low occupancy.
inline int per_warp(int64_t warp_jobs) {
  // Two blocks an SM: __launch_bounds__(kThreads, 2).
  const int64_t resident_warps = int64_t(device_info().sm_count) * 2 * kWarps;
  return static_cast<int>(std::max<int64_t>(1, ceil_div(warp_jobs, resident_warps)));
}

// Whether the programmatic dependent launch is there (sm_90 on).
inline bool can_overlap() { return device_info().major >= 9; }

// decode_fp8.cu: the FP8 kernels, for the shapes fp8_fits takes.
bool fp8_fits(const DecodeParams& p);
void launch_fp8(const DecodeParams& p, cudaStream_t stream);

}  // namespace fused_moe::cuda::decode_detail
