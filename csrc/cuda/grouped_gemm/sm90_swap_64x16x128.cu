// One token over few experts (decode with narrow experts): 64-row weight tiles
// give twice the CTAs of swap_128x16x128, so every SM streams weights.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "swap_64x16x128";
  using TileShape = cute::Shape<cute::_64, cute::_16, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = true;
};
}  // namespace

const Config swap_64x16x128 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
