// The CUDA kernels, one launcher per op over kernel_params.h's structs. Each
// launches on `stream`, never synchronises with the host, and takes its
// scratch memory from `workspace` (at least *_workspace_bytes(p) bytes,
// 256-byte aligned, allocated by the caller from PyTorch's caching
// allocator).
//
// Declared in every build, so ops.cpp has one code path: a build without
// CUDA links cuda/no_cuda.cpp, whose definitions fail with a clear message.
#pragma once

#include <cstddef>

#include "kernel_params.h"

// The CUDA runtime's own stream handle type, named without its headers.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace fused_moe::cuda {

// PyTorch's current stream on `device`; fails if torch reports an error.
cudaStream_t current_stream(int device);

void topk(const TopkParams& p, cudaStream_t stream);

size_t permute_workspace_bytes(const PermuteParams& p);
void permute(const PermuteParams& p, void* workspace, cudaStream_t stream);

void activation(const ActivationParams& p, cudaStream_t stream);

// Per tensor: the amax pass needs quantize_fp8_workspace_bytes(p) bytes.
size_t quantize_fp8_workspace_bytes(const QuantizeParams& p);
void quantize_fp8(const QuantizeParams& p, void* workspace, cudaStream_t stream);

void unpermute(const UnpermuteParams& p, cudaStream_t stream);

// Whether decode() takes these shapes (p.act and p.out not yet needed):
// 16-byte aligned rows, K <= 32, and one token or few enough slot weight
// bytes that the chain's launches would cost more. FUSED_MOE_DECODE=0:
// never; =1: whenever the shapes allow (tests and benchmarks compare the two
// paths with it).
bool decode_applies(const DecodeParams& p);
void decode(const DecodeParams& p, cudaStream_t stream);

size_t grouped_gemm_workspace_bytes(const GroupedGemmParams& p);
void grouped_gemm(const GroupedGemmParams& p, void* workspace, cudaStream_t stream);

}  // namespace fused_moe::cuda
