// The CUDA launchers of a build without CUDA (no nvcc, or FUSED_MOE_CUDA=0):
// a CUDA tensor reaching an op fails here with what to do about it.
#include <stdexcept>

#include "cuda/launch.h"

namespace fused_moe::cuda {
namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "fused_moe: this build has no CUDA kernels (built without nvcc or with "
      "FUSED_MOE_CUDA=0); move the inputs to the CPU or reinstall fused_moe with "
      "nvcc on the PATH");
}

}  // namespace

cudaStream_t current_stream(int) { no_cuda(); }
void topk(const TopkParams&, cudaStream_t) { no_cuda(); }
size_t permute_workspace_bytes(const PermuteParams&) { no_cuda(); }
void permute(const PermuteParams&, void*, cudaStream_t) { no_cuda(); }
void activation(const ActivationParams&, cudaStream_t) { no_cuda(); }
size_t quantize_fp8_workspace_bytes(const QuantizeParams&) { no_cuda(); }
void quantize_fp8(const QuantizeParams&, void*, cudaStream_t) { no_cuda(); }
void unpermute(const UnpermuteParams&, cudaStream_t) { no_cuda(); }
bool decode_applies(const DecodeParams&) { no_cuda(); }
void decode(const DecodeParams&, cudaStream_t) { no_cuda(); }
size_t grouped_gemm_workspace_bytes(const GroupedGemmParams&) { no_cuda(); }
void grouped_gemm(const GroupedGemmParams&, void*, cudaStream_t) { no_cuda(); }

}  // namespace fused_moe::cuda
