// Few rows per expert (decode): a 16-row N side, deep K tiles keep many weight bytes in flight.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "swap_128x16x128";
  using TileShape = cute::Shape<cute::_128, cute::_16, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = true;
};
}  // namespace

const Config swap_128x16x128 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
