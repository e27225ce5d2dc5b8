// Moderate rows per expert: pingpong overlaps one warp group's epilogue with the other's MMAs.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "pingpong_128x128x64";
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = false;
};
}  // namespace

const Config pingpong_128x128x64 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
