// The one sm90a grouped GEMM definition: a CUTLASS 3.x pointer-array grouped
// GEMM (TMA, warp-specialized persistent kernel) over expert-sorted rows.
// Each row of configs.cmake instantiates it once through make_config<Spec>(),
// in a translation unit generated from sm90_config.cu.in.
//
// Per expert e with rows [off[e], off[e+1]):
//   plain:   out_e   = a_e   w[e]^T   MMA (M, N, K) = (rows, N, K)
//   swap-AB: out_e^T = w[e]  a_e^T    MMA (M, N, K) = (N, rows, K), D column-major
// so with few rows per expert the weights fill the 128-wide M side of the
// tile and the rows only the narrow N side. Problem sizes, pointers and strides
// are built on the device (no host sync; host problem sizes are nullptr), and
// experts with no rows give empty groups, which the group scheduler skips.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm/sm90_configs.h"

namespace fused_moe::cuda::sm90 {

enum class Schedule { kCooperative, kPingpong };

template <class Element, class TileShape, class ClusterShape, Schedule kSchedule, bool kSwapAB_>
struct GroupedGemm {
  static constexpr bool kSwapAB = kSwapAB_;
  static constexpr bool kCooperative = kSchedule == Schedule::kCooperative;
  using MainloopSchedule = std::conditional_t<kCooperative,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = std::conditional_t<kCooperative,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;

  // Both operands are K-major in either mode; only D changes: out is row-major
  // [rows, N], which is out^T column-major.
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = std::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignment = 8;  // 16 bytes: TMA's requirement

  // D = acc + bias[e], bias read through a per-group pointer array. The bias
  // runs along out's columns: the MMA's N in plain mode (a row broadcast), its
  // M with swap-AB (a column broadcast). A null array adds zero, so one kernel
  // serves with and without bias (half the instantiations, half the build).
  using Bias = std::conditional_t<kSwapAB,
      cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, Element*, float,
                                                  cute::Stride<cute::_1, cute::_0, cute::_0>>,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element*, float,
                                                  cute::Stride<cute::_0, cute::_1, cute::_0>>>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;

  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using ProblemSize = typename ProblemShape::UnderlyingProblemShape;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignment,  // no C operand
      Element, LayoutD*, kAlignment, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The per-group arrays CUTLASS reads, carved from the front of the workspace.
  struct Groups {
    ProblemSize* sizes;
    const Element** a;
    const Element** b;
    Element** d;
    const Element** bias;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
  };

  // Hands out 256-byte-aligned pieces of a buffer (base null: just measures).
  struct Carver {
    uintptr_t base;
    size_t used = 0;
    template <class T>
    T* take(size_t count) {
      T* piece = reinterpret_cast<T*>(base + used);
      used += (count * sizeof(T) + 255) / 256 * 256;
      return piece;
    }
  };

  static Groups carve(Carver& c, int num_groups) {
    Groups g;
    g.sizes = c.template take<ProblemSize>(num_groups);
    g.a = c.template take<const Element*>(num_groups);
    g.b = c.template take<const Element*>(num_groups);
    g.d = c.template take<Element*>(num_groups);
    g.bias = c.template take<const Element*>(num_groups);
    g.stride_a = c.template take<StrideA>(num_groups);
    g.stride_b = c.template take<StrideB>(num_groups);
    g.stride_d = c.template take<StrideD>(num_groups);
    return g;
  }

  static typename Gemm::Arguments arguments(const Groups& g, int num_groups, bool has_bias, int sm_count) {
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;  // given, so CUTLASS queries nothing
    typename Fusion::Arguments fusion{{}, {has_bias ? g.bias : nullptr}, {}};
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {num_groups, g.sizes, nullptr},  // sizes on the device only
        {g.a, g.stride_a, g.b, g.stride_b},
        {fusion, nullptr, nullptr, g.d, g.stride_d},
        hw};
  }

  // Depends only on the group count and the SM count: computable on the host.
  static size_t workspace_bytes(int num_groups, int sm_count) {
    Carver c{0};
    Groups g = carve(c, num_groups);
    return c.used + Gemm::get_workspace_size(arguments(g, num_groups, true, sm_count));
  }
};

// A packed stride with its leading dimension replaced: rows `ld` elements apart.
template <class Stride>
__device__ Stride with_ld(Stride s, int64_t ld) {
  cute::get<0>(s) = ld;
  return s;
}

// Fills the per-group arrays from expert_offsets and zeroes out's rows past
// off[E]; one thread per expert, then a grid-stride loop of 16-byte stores
// (N % 8 == 0 and out 16-byte aligned on this path). Offsets are clamped to
// [0, rows] and made non-decreasing per expert, so bad ones cannot send TMA
// out of bounds (ops.cpp checks them only on the CPU).
template <class G, class Element>
__global__ void build_groups(typename G::Groups g, const Element* a, int64_t a_stride,
                             const Element* w, int64_t w_expert_stride, int64_t w_row_stride,
                             const Element* bias, Element* out, const int32_t* off,
                             int num_groups, int64_t rows, int n, int k) {
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = first; e < num_groups; e += step) {
    const int64_t begin = min(max(int64_t(off[e]), int64_t(0)), rows);
    const int m = int(min(max(int64_t(off[e + 1]), begin), rows) - begin);
    const Element* a_e = a + begin * a_stride;
    const Element* w_e = w + e * w_expert_stride;
    if constexpr (G::kSwapAB) {
      g.sizes[e] = cute::make_shape(n, m, k);
      g.a[e] = w_e;
      g.b[e] = a_e;
      g.stride_a[e] = with_ld(cutlass::make_cute_packed_stride(typename G::StrideA{}, {n, k, 1}),
                              w_row_stride);
      g.stride_b[e] = with_ld(cutlass::make_cute_packed_stride(typename G::StrideB{}, {m, k, 1}),
                              a_stride);
      g.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {n, m, 1});
    } else {
      g.sizes[e] = cute::make_shape(m, n, k);
      g.a[e] = a_e;
      g.b[e] = w_e;
      g.stride_a[e] = with_ld(cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k, 1}),
                              a_stride);
      g.stride_b[e] = with_ld(cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1}),
                              w_row_stride);
      g.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1});
    }
    g.d[e] = out + begin * n;
    if (bias) g.bias[e] = bias + e * n;
  }
  const int64_t tail = min(max(int64_t(off[num_groups]), int64_t(0)), rows);
  for (int64_t i = tail * n / kVec<Element> + first; i < rows * n / kVec<Element>; i += step) {
    reinterpret_cast<uint4*>(out)[i] = make_uint4(0, 0, 0, 0);
  }
}

inline void check(cutlass::Status status, const char* config, const char* step) {
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("fused_moe grouped_gemm (sm90 ") + config + "): " + step +
                             " failed: " + cutlassGetStatusString(status));
  }
}

template <class G, class Element>
void run_typed(const char* config, const GroupedGemmParams& p, void* workspace, int sm_count,
               cudaStream_t stream) {
  typename G::Carver carver{reinterpret_cast<uintptr_t>(workspace)};
  const typename G::Groups groups = G::carve(carver, p.num_experts);
  void* cutlass_workspace = static_cast<char*>(workspace) + carver.used;

  const int64_t vectors = p.rows * p.n / kVec<Element>;
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(
      std::min<int64_t>((vectors + threads - 1) / threads, sm_count),
      (p.num_experts + threads - 1) / threads);
  build_groups<G, Element><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      groups, static_cast<const Element*>(p.a), p.a_stride, static_cast<const Element*>(p.w),
      p.w_expert_stride, p.w_row_stride, static_cast<const Element*>(p.bias), static_cast<Element*>(p.out), p.expert_offsets,
      p.num_experts, p.rows, static_cast<int>(p.n), static_cast<int>(p.k));
  check_launch("grouped_gemm (sm90): build_groups");

  const auto args = G::arguments(groups, p.num_experts, p.bias != nullptr, sm_count);
  typename G::Gemm gemm;
  check(gemm.can_implement(args), config, "can_implement");
  check(gemm.initialize(args, cutlass_workspace, stream), config, "initialize");
  check(gemm.run(stream), config, "run");
  check_launch("grouped_gemm (sm90): the GEMM");
}

// Spec: kName, TileShape, ClusterShape, kSchedule, kSwapAB.
template <class Spec>
struct ConfigImpl {
  template <class Element>
  using G = GroupedGemm<Element, typename Spec::TileShape, typename Spec::ClusterShape,
                        Spec::kSchedule, Spec::kSwapAB>;

  static size_t workspace_bytes(int num_groups, int sm_count) {
    return std::max(G<cutlass::bfloat16_t>::workspace_bytes(num_groups, sm_count),
                    G<cutlass::half_t>::workspace_bytes(num_groups, sm_count));
  }

  static void run(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream) {
    if (p.dtype == ScalarType::BFloat16) {
      run_typed<G<cutlass::bfloat16_t>, cutlass::bfloat16_t>(Spec::kName, p, workspace, sm_count, stream);
    } else if (p.dtype == ScalarType::Half) {
      run_typed<G<cutlass::half_t>, cutlass::half_t>(Spec::kName, p, workspace, sm_count, stream);
    } else {
      throw std::runtime_error(std::string("fused_moe grouped_gemm (sm90 ") + Spec::kName +
                               "): dtype must be bfloat16 or float16");
    }
  }
};

template <class Spec>
constexpr Config make_config() {
  return Config{Spec::kName, &ConfigImpl<Spec>::workspace_bytes, &ConfigImpl<Spec>::run};
}

}  // namespace fused_moe::cuda::sm90
