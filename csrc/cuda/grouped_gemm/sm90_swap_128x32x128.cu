// Up to ~32 rows per expert.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "swap_128x32x128";
  using TileShape = cute::Shape<cute::_128, cute::_32, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = true;
};
}  // namespace

const Config swap_128x32x128 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
