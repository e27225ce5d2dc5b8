// Many rows per expert (prefill): the largest tile. Cluster 1x1 on purpose: a
// 2x1 cluster's persistent grid would need max_active_clusters set, else the
// clusters that do not fit at once run after all the others have finished.
#include "cuda/grouped_gemm/sm90_kernel.cuh"

namespace fused_moe::cuda::sm90 {

namespace {
struct Spec {
  static constexpr const char* kName = "coop_128x256x64";
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr Schedule kSchedule = Schedule::kCooperative;
  static constexpr bool kSwapAB = false;
};
}  // namespace

const Config coop_128x256x64 = make_config<Spec>();

}  // namespace fused_moe::cuda::sm90
