// Helpers shared by the CUDA kernels: error checks, dtype dispatch, element
// conversions and 16-byte packed loads/stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "cuda/launch.h"
#include "kernel_params.h"

namespace fused_moe::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fused_moe: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// Called after every launch: a bad configuration or a missing kernel image for
// this GPU is reported here, naming the kernel.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("fused_moe: " + what);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the launch heuristics need of the current device.
struct DeviceInfo {
  int sm_count;
  int major, minor;    // compute capability
  int max_smem_optin;  // bytes of shared memory a block may opt in to
};

// Queried once per device: the host code of every kernel runs on every forward.
inline const DeviceInfo& device_info() {
  int id = 0;
  check_cuda(cudaGetDevice(&id), "cudaGetDevice");
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;  // element references stay valid
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(id);
  if (it == cache.end()) {
    auto query = [id](cudaDeviceAttr attr) {
      int value = 0;
      check_cuda(cudaDeviceGetAttribute(&value, attr, id), "cudaDeviceGetAttribute");
      return value;
    };
    it = cache.emplace(id, DeviceInfo{query(cudaDevAttrMultiProcessorCount),
                                      query(cudaDevAttrComputeCapabilityMajor),
                                      query(cudaDevAttrComputeCapabilityMinor),
                                      query(cudaDevAttrMaxSharedMemoryPerBlockOptin)})
             .first;
  }
  return it->second;
}

// A 1-D grid of `blocks` blocks; fails rather than truncate past the CUDA limit.
inline unsigned grid_size(int64_t blocks, const char* op) {
  if (blocks > INT32_MAX)
    fail(std::string(op) + ": the problem needs " + std::to_string(blocks) +
         " thread blocks, more than a CUDA grid holds");
  return static_cast<unsigned>(blocks);
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// The local expert of global id `id`, or -1 when the id is outside
// [0, num_experts) or its expert lives on another rank (expert_map entry
// outside [0, num_local)). Branch-free, so unrolled callers overlap the map
// loads of several ids.
__device__ __forceinline__ int local_expert(int id, const int32_t* expert_map, int num_experts,
                                            int num_local) {
  const bool in_range = id >= 0 && id < num_experts;
  const int e = in_range && expert_map != nullptr ? expert_map[id] : id;
  return in_range && e >= 0 && e < num_local ? e : -1;
}

// Butterfly over each aligned group of L lanes (a power of two <= 32): every
// lane ends with the same bits (sums too).
template <int L, typename T, typename Op>
__device__ __forceinline__ T seg_reduce(T v, Op op) {
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o, L));
  return v;
}

// ---- dtype dispatch: f(Type<T>{}) with T the CUDA type of `dtype` ----------

template <typename T>
struct Type {
  using type = T;
};

template <typename F>
void dispatch_float(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Float: return f(Type<float>{});
    case ScalarType::BFloat16: return f(Type<__nv_bfloat16>{});
    case ScalarType::Half: return f(Type<__half>{});
    default: fail(std::string(op) + ": unsupported dtype (expected float32, bfloat16 or float16)");
  }
}

// Router logits may also be float64.
template <typename F>
void dispatch_logits(ScalarType dtype, const char* op, F&& f) {
  if (dtype == ScalarType::Double) return f(Type<double>{});
  dispatch_float(dtype, op, f);
}

// ---- conversions: all math is fp32, rounded to nearest even on store -------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---- packs: P elements moved as one load/store ------------------------------

// Elements of T in 16 bytes: the vector width of every wide path.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// P == 1 (the scalar path) or P == kVec<T> (one 16-byte access, which needs a
// 16-byte aligned address).
template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  static_assert(P == 1 || sizeof(T) * P == 16, "a pack is one element or 16 bytes");
  T e[P];
};

// Read-only (non-coherent) load: every kernel here reads inputs it never
// writes. kStream: data read once (routing's logits), evict-first in L1 and
// L2, so its lines replace each other rather than lines other kernels left
// there (the GEMMs' weights, or dirty lines whose write-back would share the
// bandwidth with this read).
template <typename T, int P, bool kStream = false>
__device__ __forceinline__ Pack<T, P> load_pack(const T* p) {
  Pack<T, P> r;
  if constexpr (P == 1) {
    r.e[0] = kStream ? __ldcs(p) : p[0];
  } else {
    const uint4* v = reinterpret_cast<const uint4*>(p);
    const uint4 raw = kStream ? __ldcs(v) : __ldg(v);
    memcpy(&r, &raw, sizeof(r));
  }
  return r;
}

template <typename T, int P>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, P>& v) {
  if constexpr (P == 1) {
    p[0] = v.e[0];
  } else {
    uint4 raw;
    memcpy(&raw, &v, sizeof(raw));
    // Spelled out: a plain uint4 assignment is sometimes split into four 4-byte stores.
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y),
                 "r"(raw.z), "r"(raw.w)
                 : "memory");
  }
}

}  // namespace fused_moe::cuda
