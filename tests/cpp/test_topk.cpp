// The CPU top-k kernel on raw buffers, without torch: forward KL with and without the tail against a direct
// double-precision evaluation, and the gradient of every divergence against central differences of its loss.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "distill/topk.h"

using namespace dpkd::distill;

namespace {

struct Case {
  int64_t n = 3, v = 300, k = 7;
  std::vector<float> logits, logprobs;
  std::vector<int64_t> ids;
  explicit Case(unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.f, 3.f);
    logits.resize(n * v);
    for (auto& x : logits) x = normal(gen);
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> p(k);
      double total = 0;
      for (auto& x : p) total += (x = std::exp(normal(gen)));
      for (int64_t c = 0; c < k; ++c) {
        ids.push_back((i * 41 + c * 37) % v);
        logprobs.push_back(static_cast<float>(std::log(0.9 * p[c] / total)));  // mass 0.9: a tail of 0.1
      }
    }
  }
  std::vector<float> losses(const RowOptions& o, bool tail, const std::vector<float>& x) const {
    std::vector<float> loss(n), stats(n * kNumStats);
    topk_forward<float>(n, {x.data(), v, v}, {ids.data(), logprobs.data(), k, tail}, nullptr, nullptr, o, loss.data(),
                        stats.data(), nullptr, 0);
    return loss;
  }
};

RowOptions options(Divergence d) {
  RowOptions o;
  o.objective = make_objective(d, 0.4, 0.2);
  o.temperature = 1.5f;
  return o;
}

}  // namespace

TEST(TopKCpu, ForwardKLMatchesDoubleEvaluation) {
  const Case c(1);
  const RowOptions o = options(Divergence::kForwardKL);
  for (bool tail : {false, true}) {
    const std::vector<float> loss = c.losses(o, tail, c.logits);
    for (int64_t i = 0; i < c.n; ++i) {
      const float* z = c.logits.data() + i * c.v;
      double m = -INFINITY, s = 0;
      for (int64_t j = 0; j < c.v; ++j) m = std::fmax(m, z[j] / 1.5);
      for (int64_t j = 0; j < c.v; ++j) s += std::exp(z[j] / 1.5 - m);
      double want = 0, mass_p = 0, mass_q = 0;
      for (int64_t k = 0; k < c.k; ++k) {
        const double lp = c.logprobs[i * c.k + k], lq = z[c.ids[i * c.k + k]] / 1.5 - m - std::log(s);
        want += std::exp(lp) * (lp - lq);
        mass_p += std::exp(lp);
        mass_q += std::exp(lq);
      }
      if (tail) want += (1 - mass_p) * (std::log(1 - mass_p) - std::log(1 - mass_q));
      EXPECT_NEAR(loss[i], want, 1e-5 * std::fabs(want)) << "row " << i << " tail " << tail;
    }
  }
}

TEST(TopKCpu, GradientMatchesCentralDifferences) {
  const Case c(2);
  std::vector<float> weight = {1.f, -0.5f, 2.f};
  for (Divergence d : {Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD, Divergence::kSkewKL,
                       Divergence::kSkewReverseKL, Divergence::kTVD}) {
    const RowOptions o = options(d);
    std::vector<float> loss(c.n), stats(c.n * kNumStats), grad(c.n * c.v);
    topk_forward<float>(c.n, {c.logits.data(), c.v, c.v}, {c.ids.data(), c.logprobs.data(), c.k, true}, nullptr,
                        weight.data(), o, loss.data(), stats.data(), grad.data(), c.v);
    for (int64_t i = 0; i < c.n; ++i) {
      double row_sum = 0;
      for (int64_t j = 0; j < c.v; ++j) row_sum += grad[i * c.v + j];
      EXPECT_NEAR(row_sum, 0.0, 1e-6) << "softmax gradients sum to 0; divergence " << static_cast<int>(d);
      // an id and a column outside the ids
      for (int64_t j : {c.ids[i * c.k], (c.ids[i * c.k] + 1) % c.v}) {
        std::vector<float> up = c.logits, down = c.logits;
        const float h = 5e-2f;  // fp32 losses: rounding / h stays ~1e-5
        up[i * c.v + j] += h;
        down[i * c.v + j] -= h;
        const double numeric = weight[i] * (c.losses(o, true, up)[i] - c.losses(o, true, down)[i]) / (2.0 * h);
        EXPECT_NEAR(grad[i * c.v + j], numeric, 1e-2 * std::fabs(numeric) + 2e-5)
            << "row " << i << " column " << j << " divergence " << static_cast<int>(d);
      }
    }
  }
}
