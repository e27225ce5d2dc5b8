// The activation formulas, one definition for the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernel_params.h"

namespace fused_moe {

// The float functions the formulas call: the C library's, unless a kernel
// passes its own (the CPU's exp vectorises).
struct LibMath {
  static FUSED_MOE_HD float exp(float x) { return expf(x); }
  static FUSED_MOE_HD float erf(float x) { return erff(x); }
  static FUSED_MOE_HD float tanh(float x) { return tanhf(x); }
};

template <typename M>
FUSED_MOE_HD float sigmoid(float x) { return 1.0f / (1.0f + M::exp(-x)); }

// act(x) of the plain activations; swigluoai is gated only (see gated_act).
template <Activation A, typename M = LibMath>
FUSED_MOE_HD float act(float x) {
  if constexpr (A == Activation::kSilu) {
    return x * sigmoid<M>(x);
  } else if constexpr (A == Activation::kGelu) {
    return 0.5f * x * (1.0f + M::erf(x * 0.70710678118654752f));
  } else if constexpr (A == Activation::kGeluTanh) {
    const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + M::tanh(inner));
  } else if constexpr (A == Activation::kRelu2) {
    const float r = x > 0.0f ? x : 0.0f;
    return r * r;
  } else {  // kSwigluOai without an up projection: the gate half alone
    const float g = fminf(x, kSwigluLimit);
    return g * sigmoid<M>(kSwigluAlpha * g);
  }
}

// act(gate) * up, with gpt-oss's clamped form for swigluoai.
template <Activation A, typename M = LibMath>
FUSED_MOE_HD float gated_act(float gate, float up) {
  if constexpr (A == Activation::kSwigluOai) {
    const float u = fminf(fmaxf(up, -kSwigluLimit), kSwigluLimit);
    return (u + 1.0f) * act<A, M>(gate);
  } else {
    return act<A, M>(gate) * up;
  }
}

// Calls f(std::integral_constant<Activation, a>{}) so kernels specialise on it.
template <typename F>
void dispatch_activation(Activation a, F&& f) {
  using A = Activation;
  switch (a) {
    case A::kSilu: f(std::integral_constant<A, A::kSilu>{}); break;
    case A::kGelu: f(std::integral_constant<A, A::kGelu>{}); break;
    case A::kGeluTanh: f(std::integral_constant<A, A::kGeluTanh>{}); break;
    case A::kRelu2: f(std::integral_constant<A, A::kRelu2>{}); break;
    case A::kSwigluOai: f(std::integral_constant<A, A::kSwigluOai>{}); break;
  }
}

}  // namespace fused_moe
