// PyTorch's current CUDA stream, through the stable ABI's C shim.
#include <stdexcept>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "cuda/launch.h"

namespace fused_moe::cuda {

cudaStream_t current_stream(int device) {
  void* stream = nullptr;
  if (aoti_torch_get_current_cuda_stream(device, &stream) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("fused_moe: could not get the current CUDA stream of cuda:" +
                             std::to_string(device));
  return static_cast<cudaStream_t>(stream);
}

}  // namespace fused_moe::cuda
