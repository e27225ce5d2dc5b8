// Top-k routing on the CPU: the plain loop the CUDA kernel must agree with.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/common.h"

namespace fused_moe::cpu {
namespace {

// Total order used for every selection: larger wins, NaN loses to any number
// (so ids stay in range whatever the logits), equal values keep the lower index.
bool better(float a, float b) { return a > b || (std::isnan(b) && !std::isnan(a)); }

// Index of the best entry of v[0..n) not yet taken, or -1 if all are taken.
int argbest(const float* v, const std::vector<char>& taken, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || better(v[i], v[best])) best = i;
  }
  return best;
}

void score_row(const float* logits, int n, Scoring scoring, float* out) {
  if (scoring == Scoring::kSigmoid) {
    for (int e = 0; e < n; ++e) out[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    return;
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int e = 0; e < n; ++e) mx = std::fmax(mx, logits[e]);
  float sum = 0.0f;
  for (int e = 0; e < n; ++e) sum += (out[e] = std::exp(logits[e] - mx));
  for (int e = 0; e < n; ++e) out[e] /= sum;
}

// Marks every expert outside the topk_group best groups as taken.
void mask_groups(const TopkParams& p, const float* sel, std::vector<char>& taken) {
  const int per_group = p.num_experts / p.num_groups;
  std::vector<float> group_score(p.num_groups);
  std::vector<char> none(per_group, 0);
  for (int g = 0; g < p.num_groups; ++g) {
    const float* s = sel + g * per_group;
    const int first = argbest(s, none, per_group);
    float score = s[first];
    if (p.bias != nullptr && per_group > 1) {  // sum of the group's top two
      std::vector<char> t(per_group, 0);
      t[first] = 1;
      score += s[argbest(s, t, per_group)];
    }
    group_score[g] = score;
  }
  std::vector<char> group_taken(p.num_groups, 0);
  for (int i = 0; i < p.topk_group; ++i)
    group_taken[argbest(group_score.data(), group_taken, p.num_groups)] = 1;
  for (int e = 0; e < p.num_experts; ++e)
    if (!group_taken[e / per_group]) taken[e] = 1;
}

template <typename T>
void topk_rows(const TopkParams& p, int64_t begin, int64_t end) {
  const int n = p.num_experts;
  std::vector<float> logits(n), scores(n), sel(n);
  std::vector<char> taken(n);
  for (int64_t t = begin; t < end; ++t) {
    const T* row = static_cast<const T*>(p.logits) + t * n;
    for (int e = 0; e < n; ++e) logits[e] = static_cast<float>(row[e]);
    score_row(logits.data(), n, p.scoring, scores.data());
    for (int e = 0; e < n; ++e) sel[e] = scores[e] + (p.bias ? p.bias[e] : 0.0f);
    std::fill(taken.begin(), taken.end(), 0);
    if (p.num_groups > 0) mask_groups(p, sel.data(), taken);

    float* w = p.weights + t * p.topk;
    int32_t* ids = p.ids + t * p.topk;
    float sum = 0.0f;
    for (int k = 0; k < p.topk; ++k) {
      const int e = argbest(sel.data(), taken, n);
      taken[e] = 1;
      ids[k] = e;
      w[k] = scores[e];
      sum += scores[e];
    }
    const float scale = p.routed_scaling_factor / (p.renormalize ? sum : 1.0f);
    for (int k = 0; k < p.topk; ++k) w[k] *= scale;
  }
}

}  // namespace

void topk(const TopkParams& p) {
  dispatch_float(p.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(p.num_tokens, 64, [&](int64_t b, int64_t e) { topk_rows<T>(p, b, e); });
  }, /*allow_double=*/true);
}

}  // namespace fused_moe::cpu
