// The ops as registered in registration.cpp: check inputs, allocate outputs,
// run the CPU or CUDA kernel of the inputs' device. Inputs of any strides:
// each op reads views in place or copies them once (ops.cpp says which).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/csrc/stable/tensor.h>

namespace fused_moe {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> topk(Tensor gating_output, int64_t topk, bool renormalize,
                                std::string scoring_func, OptTensor e_score_correction_bias,
                                int64_t num_expert_group, int64_t topk_group,
                                double routed_scaling_factor);

std::tuple<Tensor, Tensor, Tensor> permute(Tensor hidden_states, Tensor topk_ids,
                                           int64_t num_local_experts, OptTensor expert_map,
                                           OptTensor row_weights);

Tensor grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets, OptTensor bias);

Tensor activation(Tensor x, std::string activation, bool is_act_and_mul);

Tensor unpermute(Tensor y, Tensor inv_index, OptTensor topk_weights);

Tensor fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights,
                     Tensor topk_ids, std::string activation, bool is_act_and_mul, OptTensor w13_bias, OptTensor w2_bias,
                     OptTensor expert_map, int64_t global_num_experts,
                     bool apply_router_weight_on_input);

}  // namespace fused_moe
