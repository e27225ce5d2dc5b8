// Up to ~64 rows per expert.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "swap_128x64x64";
  using TileShape = cute::Shape<cute::_128, cute::_64, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = true;
};
}  // namespace

const Config swap_128x64x64 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
