// Every op schema of fused_moe, in one place. The same entry points (ops.cpp)
// serve the CPU and CUDA dispatch keys; they pick the kernel by device. Fake
// (meta) kernels for torch.compile are in python/fused_moe/_ops.py.
#include <Python.h>

#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(fused_moe, m) {
  // Routing: scores (softmax|sigmoid), optional bias for selection, grouped
  // top-k when num_expert_group > 0, renormalize, scale -> (f32 weights, int32 ids).
  m.def("topk(Tensor gating_output, int topk, bool renormalize, str scoring_func, "
        "Tensor? e_score_correction_bias, int num_expert_group, int topk_group, "
        "float routed_scaling_factor) -> (Tensor, Tensor)");
  // Gathers token rows into expert order -> (rows [M*K, H], expert_offsets
  // [E_local+1], inv_index [M, K]); non-local slots get index -1 and zero rows at the end.
  m.def("permute(Tensor hidden_states, Tensor topk_ids, int num_local_experts, "
        "Tensor? expert_map, Tensor? row_weights) -> (Tensor, Tensor, Tensor)");
  // out[r] = w[e] @ a[r] (+ bias[e]) for the rows of expert e; rows past the last offset are 0.
  // FP8 a and w: a = q * a_scale, w = q * w_scale (block, channel or tensor scales).
  // 4-bit w (uint8 [E, N, K/2]): mxfp4 with uint8/e8m0 w_scale, int4 with float
  // w_scale [E, N, K/g] and optional uint8 zero points w_zp of its shape.
  m.def("grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets, Tensor? bias, "
        "Tensor? a_scale=None, Tensor? w_scale=None, int[]? block_shape=None, "
        "ScalarType? out_dtype=None, Tensor? w_zp=None) -> Tensor");
  // Rows -> (fp8 e4m3fn, f32 scales): per row per group_size columns (> 0), per row (0),
  // per tensor (-1), or the static scale given.
  m.def("quantize_fp8(Tensor x, int group_size, Tensor? scale=None) -> (Tensor, Tensor)");
  // act(gate) * up (is_act_and_mul) or act(x): silu, gelu, gelu_tanh, relu2, swigluoai.
  m.def("activation(Tensor x, str activation, bool is_act_and_mul) -> Tensor");
  // out[t] = sum_k w[t, k] * y[inv_index[t, k]], fp32 accumulation in order of k.
  m.def("unpermute(Tensor y, Tensor inv_index, Tensor? topk_weights) -> Tensor");
  // The whole expert computation: permute, GEMM (w13), activation, GEMM (w2), unpermute.
  m.def("fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, "
        "Tensor topk_ids, str activation, bool is_act_and_mul, Tensor? w13_bias, "
        "Tensor? w2_bias, Tensor? expert_map, int global_num_experts, "
        "bool apply_router_weight_on_input, Tensor? w13_scale=None, Tensor? w2_scale=None, "
        "Tensor? a13_scale=None, Tensor? a2_scale=None, int[]? block_shape=None, "
        "bool per_act_token_quant=False, Tensor? w13_zp=None, Tensor? w2_zp=None) -> Tensor");
}

#define FUSED_MOE_IMPLS(m)                                          \
  m.impl("topk", TORCH_BOX(&fused_moe::topk));                      \
  m.impl("permute", TORCH_BOX(&fused_moe::permute));                \
  m.impl("grouped_gemm", TORCH_BOX(&fused_moe::grouped_gemm));      \
  m.impl("quantize_fp8", TORCH_BOX(&fused_moe::quantize_fp8));      \
  m.impl("activation", TORCH_BOX(&fused_moe::activation));          \
  m.impl("unpermute", TORCH_BOX(&fused_moe::unpermute));            \
  m.impl("fused_experts", TORCH_BOX(&fused_moe::fused_experts))

STABLE_TORCH_LIBRARY_IMPL(fused_moe, CPU, m) { FUSED_MOE_IMPLS(m); }

// Registered in every build: without CUDA kernels, a CUDA tensor reaches the
// launchers of cuda/no_cuda.cpp, which say so.
STABLE_TORCH_LIBRARY_IMPL(fused_moe, CUDA, m) { FUSED_MOE_IMPLS(m); }

// What this binary was built with, for `python -m fused_moe info` (read with ctypes).
extern "C" __attribute__((visibility("default"))) const char* fused_moe_build_info() {
  return FUSED_MOE_BUILD_INFO;
}

// An empty CPython module: importing fused_moe._C runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
