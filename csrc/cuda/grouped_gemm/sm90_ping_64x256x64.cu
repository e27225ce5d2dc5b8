// A few hundred rows per expert: 64-row tiles pad each expert's last tile by
// half as much as 128-row ones. Pingpong: each consumer warp group owns a
// whole 64x256 tile, and one's epilogue overlaps the other's mainloop.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "ping_64x256x64";
  using TileShape = cute::Shape<cute::_64, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kPingpong;
  static constexpr bool kSwapAB = false;
};
}  // namespace

const Config ping_64x256x64 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
