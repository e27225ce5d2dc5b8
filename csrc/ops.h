// The ops as registered in registration.cpp: check inputs, allocate outputs,
// run the CPU or CUDA kernel of the inputs' device. Inputs of any strides:
// each op reads views in place or copies them once (ops.cpp says which).
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/tensor.h>

namespace fused_moe {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using OptInts = std::optional<std::vector<int64_t>>;
using torch::headeronly::ScalarType;

std::tuple<Tensor, Tensor> topk(Tensor gating_output, int64_t topk, bool renormalize,
                                std::string scoring_func, OptTensor e_score_correction_bias,
                                int64_t num_expert_group, int64_t topk_group,
                                double routed_scaling_factor);

std::tuple<Tensor, Tensor, Tensor> permute(Tensor hidden_states, Tensor topk_ids,
                                           int64_t num_local_experts, OptTensor expert_map,
                                           OptTensor row_weights);

Tensor grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets, OptTensor bias, OptTensor a_scale,
                    OptTensor w_scale, OptInts block_shape, std::optional<ScalarType> out_dtype,
                    OptTensor w_zp);

std::tuple<Tensor, Tensor> quantize_fp8(Tensor x, int64_t group_size, OptTensor scale);

Tensor activation(Tensor x, std::string activation, bool is_act_and_mul);

Tensor unpermute(Tensor y, Tensor inv_index, OptTensor topk_weights);

Tensor fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights,
                     Tensor topk_ids, std::string activation, bool is_act_and_mul, OptTensor w13_bias, OptTensor w2_bias,
                     OptTensor expert_map, int64_t global_num_experts,
                     bool apply_router_weight_on_input, OptTensor w13_scale, OptTensor w2_scale,
                     OptTensor a13_scale, OptTensor a2_scale, OptInts block_shape,
                     bool per_act_token_quant, OptTensor w13_zp, OptTensor w2_zp);

}  // namespace fused_moe
