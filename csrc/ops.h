// The ops as registered in registration.cpp: check inputs, allocate outputs,
// run the CPU or CUDA kernel of the inputs' device.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/csrc/stable/tensor.h>

namespace fused_moe {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> topk(const Tensor& gating_output, int64_t topk, bool renormalize,
                                std::string scoring_func, OptTensor e_score_correction_bias,
                                int64_t num_expert_group, int64_t topk_group,
                                double routed_scaling_factor);

std::tuple<Tensor, Tensor, Tensor> permute(const Tensor& hidden_states, const Tensor& topk_ids,
                                           int64_t num_local_experts, OptTensor expert_map,
                                           OptTensor row_weights);

Tensor grouped_gemm(const Tensor& a, const Tensor& w, const Tensor& expert_offsets,
                    OptTensor bias);

Tensor activation(const Tensor& x, std::string activation, bool is_act_and_mul);

Tensor unpermute(const Tensor& y, const Tensor& inv_index, OptTensor topk_weights);

Tensor fused_experts(const Tensor& hidden_states, const Tensor& w13, const Tensor& w2,
                     const Tensor& topk_weights, const Tensor& topk_ids, std::string activation,
                     bool is_act_and_mul, OptTensor w13_bias, OptTensor w2_bias,
                     OptTensor expert_map, int64_t global_num_experts,
                     bool apply_router_weight_on_input);

}  // namespace fused_moe
