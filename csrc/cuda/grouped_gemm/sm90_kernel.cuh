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
//
// FP8 block rows (Inputs::kFp8Block): e4m3 a and w, scaled in the mainloop
// (CUTLASS's blockwise FP8 kernels) per row per 128 columns of a and per
// 128x128 block of w. Those kernels read each group's scales M/N-major from a
// layout they derive from the group's problem size, so build_groups copies the
// op's row-major scales into that order in the workspace.
//
// FP8 row/col rows (Inputs::kFp8RowCol): e4m3 a and w, a scaled per row or per
// tensor, w per output channel or per expert. The scales are constant along
// K, so they multiply the fp32 accumulator in the epilogue and the mainloop is
// the plain FP8 one (fast accumulation: nothing to apply per K block). They
// are read in place through per-group pointers, each a vector along its side
// of the tile or, with a false stride, a scalar.
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
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm/sm90_configs.h"

namespace fused_moe::cuda::sm90 {

enum class Schedule { kCooperative, kPingpong };

namespace fusion = cutlass::epilogue::fusion;

// ElementIn: of a and w (Element, or float_e4m3_t with FP8 inputs); Element: of out and bias.
template <class ElementIn, class Element, class TileShape, class ClusterShape, Schedule kSchedule,
          bool kSwapAB_, Inputs kInputs>
struct GroupedGemm {
  static constexpr bool kSwapAB = kSwapAB_;
  static constexpr bool kFp8Block = kInputs == Inputs::kFp8Block;
  static constexpr bool kFp8RowCol = kInputs == Inputs::kFp8RowCol;
  static constexpr bool kFp8 = kFp8Block || kFp8RowCol;
  static constexpr bool kCooperative = kSchedule == Schedule::kCooperative;
  template <class Cooperative, class Pingpong>
  using BySchedule = std::conditional_t<kCooperative, Cooperative, Pingpong>;
  using MainloopSchedule = std::conditional_t<kFp8Block,
      BySchedule<cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                 cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise>,
      std::conditional_t<kFp8RowCol,
          BySchedule<cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum>,
          BySchedule<cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>>>;
  using EpilogueSchedule = BySchedule<cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                                      cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;

  // Both operands are K-major in either mode; only D changes: out is row-major
  // [rows, N], which is out^T column-major.
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = std::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignment = 8;  // of out: 16 bytes, TMA's requirement
  static constexpr int kAlignmentIn = 16 / int(sizeof(ElementIn));

  // Scales of the MMA's A and B: per row of the token rows (granularity 1)
  // and per 128 of the weight rows, 128 along K; swap-AB swaps them.
  using ScaleConfig = std::conditional_t<kSwapAB,
      cutlass::detail::Sm90BlockwiseScaleConfig<kScaleBlock, 1, kScaleBlock>,
      cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock>>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using MainloopLayoutA = std::conditional_t<kFp8Block, cute::tuple<LayoutA*, LayoutSFA*>, LayoutA*>;
  using MainloopLayoutB = std::conditional_t<kFp8Block, cute::tuple<LayoutB*, LayoutSFB*>, LayoutB*>;

  // D = acc + bias[e], bias read through a per-group pointer array. The bias
  // runs along out's columns: the MMA's N in plain mode (a row broadcast), its
  // M with swap-AB (a column broadcast). A null array adds zero, so one kernel
  // serves with and without bias (half the instantiations, half the build).
  using Bias = std::conditional_t<kSwapAB,
      fusion::Sm90ColBroadcast<0, TileShape, Element*, float,
                               cute::Stride<cute::_1, cute::_0, cute::_0>>,
      fusion::Sm90RowBroadcast<0, TileShape, Element*, float,
                               cute::Stride<cute::_0, cute::_1, cute::_0>>>;
  template <template <class> class Op, class Out>
  using Compute = fusion::Sm90Compute<Op, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using PlainFusion = fusion::Sm90EVT<Compute<cutlass::plus, Element>, fusion::Sm90AccFetch, Bias>;

  // FP8 row/col: D = scale_m * (scale_n * acc) + bias[e], scale_m along the
  // MMA's M (a column broadcast: a's rows in plain mode, w's with swap-AB) and
  // scale_n along its N. The stride's bool says vector (true) or scalar; the
  // alignment of 1 lets a group's vector start at any row.
  using ScaleM = fusion::Sm90ColBroadcast<0, TileShape, float*, float,
                                          cute::Stride<bool, cute::_0, int64_t>, 1>;
  using ScaleN = fusion::Sm90RowBroadcast<0, TileShape, float*, float,
                                          cute::Stride<cute::_0, bool, int64_t>, 1>;
  using RowColFusion = fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, Element>, ScaleM,
      fusion::Sm90EVT<Compute<cutlass::multiplies, float>, ScaleN, fusion::Sm90AccFetch>, Bias>;

  using Fusion = std::conditional_t<kFp8RowCol, RowColFusion, PlainFusion>;

  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using ProblemSize = typename ProblemShape::UnderlyingProblemShape;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignment,  // no C operand
      Element, LayoutD*, kAlignment, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementIn, MainloopLayoutA, kAlignmentIn, ElementIn, MainloopLayoutB, kAlignmentIn, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The per-group arrays CUTLASS reads, carved from the front of the workspace;
  // with FP8 also each group's scale pointers (sfa: of the MMA's A, its M side;
  // sfb: of B), and with block scales the scales in CUTLASS's order:
  // row_scales[off[e] * kb + k * rows_e + r] and weight_scales[(e * kb + k) * nb + n].
  struct Groups {
    ProblemSize* sizes;
    const ElementIn** a;
    const ElementIn** b;
    Element** d;
    const Element** bias;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    const float** sfa;
    const float** sfb;
    float* row_scales;
    float* weight_scales;
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

  static Groups carve(Carver& c, const GroupedGemmParams& p) {
    const int num_groups = p.num_experts;
    Groups g{};
    g.sizes = c.template take<ProblemSize>(num_groups);
    g.a = c.template take<const ElementIn*>(num_groups);
    g.b = c.template take<const ElementIn*>(num_groups);
    g.d = c.template take<Element*>(num_groups);
    g.bias = c.template take<const Element*>(num_groups);
    g.stride_a = c.template take<StrideA>(num_groups);
    g.stride_b = c.template take<StrideB>(num_groups);
    g.stride_d = c.template take<StrideD>(num_groups);
    if constexpr (kFp8) {
      g.sfa = c.template take<const float*>(num_groups);
      g.sfb = c.template take<const float*>(num_groups);
    }
    if constexpr (kFp8Block) {
      const int64_t kb = ceil_div(p.k, kScaleBlock), nb = ceil_div(p.n, kScaleBlock);
      g.row_scales = c.template take<float>(p.rows * kb);
      g.weight_scales = c.template take<float>(num_groups * nb * kb);
    }
    return g;
  }

  static typename Fusion::Arguments fusion_arguments(const Groups& g, const GroupedGemmParams& p) {
    const Element* const* bias = p.bias ? g.bias : nullptr;
    if constexpr (kFp8RowCol) {
      const bool a_vector = row_scales_of(p.a_scale, p.rows, p.k) == RowScales::kPerRow;
      const bool w_vector = row_scales_of(p.w_scale, p.n, p.k) == RowScales::kPerRow;
      const bool m_vector = kSwapAB ? w_vector : a_vector, n_vector = kSwapAB ? a_vector : w_vector;
      return {{g.sfa, 0.0f, {m_vector, cute::_0{}, 0}},
              {{g.sfb, 0.0f, {cute::_0{}, n_vector, 0}}, {}, {}},
              {bias},
              {}};
    } else {
      return {{}, {bias}, {}};
    }
  }

  static typename Gemm::Arguments arguments(const Groups& g, const GroupedGemmParams& p,
                                            int sm_count) {
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;  // given, so CUTLASS queries nothing
    typename Gemm::GemmKernel::MainloopArguments mainloop;
    if constexpr (kFp8Block) {
      // The scale layouts are derived from each group's problem size (not read).
      mainloop = {g.a, g.stride_a, g.b, g.stride_b, g.sfa, nullptr, g.sfb, nullptr};
    } else {
      mainloop = {g.a, g.stride_a, g.b, g.stride_b};
    }
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {p.num_experts, g.sizes, nullptr},  // sizes on the device only
        mainloop,
        {fusion_arguments(g, p), nullptr, nullptr, g.d, g.stride_d},
        hw};
  }

  // Depends only on the shapes and the SM count: computable on the host.
  static size_t workspace_bytes(const GroupedGemmParams& p, int sm_count) {
    Carver c{0};
    Groups g = carve(c, p);
    return c.used + Gemm::get_workspace_size(arguments(g, p, sm_count));
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
// The expert whose clamped rows [begin, end) hold row r, or -1 (rows past off[E]).
__device__ inline int expert_of_row(const int32_t* off, int num_groups, int64_t rows, int64_t r,
                                    int64_t& begin, int64_t& count) {
  int lo = 0, hi = num_groups - 1;
  while (lo < hi) {  // the last expert whose first row is <= r
    const int mid = (lo + hi + 1) / 2;
    if (min(max(int64_t(off[mid]), int64_t(0)), rows) <= r) lo = mid; else hi = mid - 1;
  }
  begin = min(max(int64_t(off[lo]), int64_t(0)), rows);
  count = min(max(int64_t(off[lo + 1]), begin), rows) - begin;
  return r >= begin && r < begin + count ? lo : -1;
}

// FP8: the scales of a (row-major [R, kb]) and w (row-major [E, nb, kb]) in
// the M/N-major order of each group (Groups), a grid-stride loop over both.
template <class G>
__device__ void order_scales(const G& g, const GroupedGemmParams& p, int64_t first, int64_t step) {
  const int64_t kb = ceil_div(p.k, kScaleBlock), nb = ceil_div(p.n, kScaleBlock);
  const int64_t used = min(max(int64_t(p.expert_offsets[p.num_experts]), int64_t(0)), p.rows);
  for (int64_t i = first; i < used * kb; i += step) {
    const int64_t r = i / kb, c = i % kb;
    int64_t begin, count;
    if (expert_of_row(p.expert_offsets, p.num_experts, p.rows, r, begin, count) < 0) continue;
    g.row_scales[begin * kb + c * count + r - begin] = p.a_scale.data[r * p.a_scale.row_stride + c];
  }
  for (int64_t i = first; i < p.num_experts * nb * kb; i += step) {
    const int64_t e = i / (nb * kb), n = i / kb % nb, c = i % kb;
    g.weight_scales[(e * kb + c) * nb + n] =
        p.w_scale.data[e * p.w_scale.expert_stride + n * p.w_scale.row_stride + c];
  }
}

// FP8: the first scale of group e's rows of a and of w[e]. Block scales are
// read from the workspace (order_scales); row/col scales in place, where a
// scale for all rows (or all of w[e]) is its one element, read with stride 0.
struct GroupScales {
  const float* rows;
  const float* weights;
};

template <class G>
__device__ GroupScales group_scales(const typename G::Groups& g, const GroupedGemmParams& p,
                                    int64_t e, int64_t begin) {
  if constexpr (G::kFp8Block) {
    const int64_t kb = ceil_div(p.k, kScaleBlock), nb = ceil_div(p.n, kScaleBlock);
    return {g.row_scales + begin * kb, g.weight_scales + e * nb * kb};
  } else {
    const ScaleGrid &a = p.a_scale, &w = p.w_scale;
    return {a.data + begin / a.rows_per * a.row_stride, w.data + e * w.expert_stride};
  }
}

template <class G, class ElementIn, class Element>
__global__ void build_groups(typename G::Groups g, GroupedGemmParams p) {
  const ElementIn* a = static_cast<const ElementIn*>(p.a);
  const ElementIn* w = static_cast<const ElementIn*>(p.w);
  const Element* bias = static_cast<const Element*>(p.bias);
  Element* out = static_cast<Element*>(p.out);
  const int32_t* off = p.expert_offsets;
  const int num_groups = p.num_experts, n = int(p.n), k = int(p.k);
  const int64_t rows = p.rows, a_stride = p.a_stride;
  const int64_t w_expert_stride = p.w_expert_stride, w_row_stride = p.w_row_stride;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = first; e < num_groups; e += step) {
    const int64_t begin = min(max(int64_t(off[e]), int64_t(0)), rows);
    const int m = int(min(max(int64_t(off[e + 1]), begin), rows) - begin);
    const ElementIn* a_e = a + begin * a_stride;
    const ElementIn* w_e = w + e * w_expert_stride;
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
    if constexpr (G::kFp8) {
      const GroupScales s = group_scales<G>(g, p, e, begin);
      g.sfa[e] = G::kSwapAB ? s.weights : s.rows;
      g.sfb[e] = G::kSwapAB ? s.rows : s.weights;
    }
  }
  if constexpr (G::kFp8Block) order_scales(g, p, first, step);
  const int64_t tail = p.zero_tail ? min(max(int64_t(off[num_groups]), int64_t(0)), rows) : rows;
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

template <class G, class ElementIn, class Element>
void run_typed(const char* config, const GroupedGemmParams& p, void* workspace, int sm_count,
               cudaStream_t stream) {
  typename G::Carver carver{reinterpret_cast<uintptr_t>(workspace)};
  const typename G::Groups groups = G::carve(carver, p);
  void* cutlass_workspace = static_cast<char*>(workspace) + carver.used;

  const int64_t vectors = p.rows * p.n / kVec<Element>;
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(
      std::min<int64_t>((vectors + threads - 1) / threads, sm_count),
      (p.num_experts + threads - 1) / threads);
  build_groups<G, ElementIn, Element><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(groups, p);
  check_launch("grouped_gemm (sm90): build_groups");

  const auto args = G::arguments(groups, p, sm_count);
  typename G::Gemm gemm;
  check(gemm.can_implement(args), config, "can_implement");
  check(gemm.initialize(args, cutlass_workspace, stream), config, "initialize");
  check(gemm.run(stream), config, "run");
  check_launch("grouped_gemm (sm90): the GEMM");
}

// Spec: kName, TileShape, ClusterShape, kSchedule, kSwapAB, kInputs.
template <class Spec>
struct ConfigImpl {
  // The inputs are of the output's type, or e4m3.
  template <class Element>
  using In = std::conditional_t<Spec::kInputs == Inputs::k16bit, Element, cutlass::float_e4m3_t>;
  template <class Element>
  using G = GroupedGemm<In<Element>, Element, typename Spec::TileShape,
                        typename Spec::ClusterShape, Spec::kSchedule, Spec::kSwapAB,
                        Spec::kInputs>;

  static size_t workspace_bytes(const GroupedGemmParams& p, int sm_count) {
    return std::max(G<cutlass::bfloat16_t>::workspace_bytes(p, sm_count),
                    G<cutlass::half_t>::workspace_bytes(p, sm_count));
  }

  template <class Element>
  static void run_as(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream) {
    run_typed<G<Element>, In<Element>, Element>(Spec::kName, p, workspace, sm_count, stream);
  }

  static void run(const GroupedGemmParams& p, void* workspace, int sm_count, cudaStream_t stream) {
    if (p.dtype == ScalarType::BFloat16) {
      run_as<cutlass::bfloat16_t>(p, workspace, sm_count, stream);
    } else if (p.dtype == ScalarType::Half) {
      run_as<cutlass::half_t>(p, workspace, sm_count, stream);
    } else {
      throw std::runtime_error(std::string("fused_moe grouped_gemm (sm90 ") + Spec::kName +
                               "): dtype must be bfloat16 or float16");
    }
  }
};

template <class Spec>
constexpr Config make_config() {
  return Config{Spec::kName, Spec::kInputs, &ConfigImpl<Spec>::workspace_bytes,
                &ConfigImpl<Spec>::run};
}

}  // namespace fused_moe::cuda::sm90
