// The CPU distillation kernels on raw buffers against a plain double-precision reference, without torch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "distill/objectives.h"

using namespace dpkd::distill;

namespace {

std::vector<float> random_logits(int64_t n, float scale, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(gen);
  return v;
}

std::vector<double> log_softmax(const float* z, int64_t v, double temperature) {
  double m = -INFINITY;
  for (int64_t j = 0; j < v; ++j) m = std::fmax(m, z[j] / temperature);
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(z[j] / temperature - m);
  std::vector<double> out(v);
  for (int64_t j = 0; j < v; ++j) out[j] = z[j] / temperature - m - std::log(s);
  return out;
}

// Reference divergence of one row in double, straight from the definitions.
double reference(Divergence d, const float* s, const float* t, int64_t v, double temperature, double beta, double alpha) {
  const auto lq = log_softmax(s, v, temperature), lp = log_softmax(t, v, temperature);
  double acc = 0;
  for (int64_t j = 0; j < v; ++j) {
    const double q = std::exp(lq[j]), p = std::exp(lp[j]);
    switch (d) {
      case Divergence::kForwardKL: acc += p * (lp[j] - lq[j]); break;
      case Divergence::kReverseKL: acc += q * (lq[j] - lp[j]); break;
      case Divergence::kJSD: {
        const double m = beta * p + (1 - beta) * q;
        acc += beta * p * (lp[j] - std::log(m)) + (1 - beta) * q * (lq[j] - std::log(m));
        break;
      }
      case Divergence::kSkewKL: acc += p * (lp[j] - std::log(alpha * p + (1 - alpha) * q)); break;
      case Divergence::kSkewReverseKL: acc += q * (lq[j] - std::log((1 - alpha) * p + alpha * q)); break;
      case Divergence::kTVD: acc += 0.5 * std::fabs(p - q); break;
    }
  }
  return acc;
}

}  // namespace

class DistillCpu : public ::testing::TestWithParam<Divergence> {};

TEST_P(DistillCpu, LossAndGradientMatchDoubleReference) {
  const Divergence d = GetParam();
  const int64_t n = 3, v = 777;  // not a multiple of the tile
  const double temperature = 1.7, beta = 0.3, alpha = 0.2;
  auto s = random_logits(n * v, 3.f, 1), t = random_logits(n * v, 3.f, 2);
  RowOptions o;
  o.objective = make_objective(d, beta, alpha);
  o.temperature = static_cast<float>(temperature);
  std::vector<float> loss(n), stats(n * kNumStats), state(n * kRowState), grad(n * v);
  forward<float>(n, {s.data(), v, v}, {t.data(), v, v}, nullptr, o, loss.data(), stats.data(), state.data());
  const std::vector<float> ones(n, 1.f);
  backward<float>(n, ones.data(), {s.data(), v, v}, {t.data(), v, v}, nullptr, state.data(), o, grad.data(), v);
  for (int64_t i = 0; i < n; ++i) {
    const float* si = s.data() + i * v;
    const float* ti = t.data() + i * v;
    EXPECT_NEAR(loss[i], reference(d, si, ti, v, temperature, beta, alpha), 2e-5 * (1 + std::fabs(loss[i])));
    // Central differences of the double reference in a few coordinates.
    std::vector<float> bumped(si, si + v);
    for (int64_t j : {int64_t{0}, int64_t{5}, v - 1}) {
      const float h = 1e-2f;
      bumped[j] = si[j] + h;
      const double up = reference(d, bumped.data(), ti, v, temperature, beta, alpha);
      bumped[j] = si[j] - h;
      const double down = reference(d, bumped.data(), ti, v, temperature, beta, alpha);
      bumped[j] = si[j];
      const double fd = (up - down) / (2.0 * (static_cast<double>(si[j] + h) - si[j]));
      EXPECT_NEAR(grad[i * v + j], fd, 1e-3 * (1e-3 + std::fabs(fd))) << "row " << i << " col " << j;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllObjectives, DistillCpu,
                         ::testing::Values(Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD,
                                           Divergence::kSkewKL, Divergence::kSkewReverseKL, Divergence::kTVD));

TEST(DistillCpu, InPlaceBackwardEqualsOutOfPlace) {
  const int64_t n = 4, v = 300;
  auto s = random_logits(n * v, 2.f, 3), t = random_logits(n * v, 2.f, 4);
  RowOptions o;
  o.objective = make_objective(Divergence::kJSD, 0.5, 0.1);
  o.standardize = true;
  std::vector<float> loss(n), stats(n * kNumStats), state(n * kRowState), grad(n * v);
  forward<float>(n, {s.data(), v, v}, {t.data(), v, v}, nullptr, o, loss.data(), stats.data(), state.data());
  const std::vector<float> g{0.5f, 1.f, 0.f, 2.f};
  backward<float>(n, g.data(), {s.data(), v, v}, {t.data(), v, v}, nullptr, state.data(), o, grad.data(), v);
  backward<float>(n, g.data(), {s.data(), v, v}, {t.data(), v, v}, nullptr, state.data(), o, s.data(), v);
  for (int64_t k = 0; k < n * v; ++k) ASSERT_EQ(s[k], grad[k]) << k;
  for (int64_t j = 0; j < v; ++j) ASSERT_EQ(grad[2 * v + j], 0.f);  // zero upstream gradient
}

TEST(DistillCpu, ForwardBackwardEqualsTheTwoPassesAndSkipsRowsWithoutWeight) {
  const int64_t n = 4, v = 300;
  auto s = random_logits(n * v, 2.f, 5), t = random_logits(n * v, 2.f, 6);
  s[1 * v + 7] = NAN;  // a row without weight is not even read
  RowOptions o;
  o.objective = make_objective(Divergence::kJSD, 0.3, 0.1);
  const std::vector<float> g{0.5f, 0.f, 1.f, 2.f};
  std::vector<float> loss(n), stats(n * kNumStats), state(n * kRowState), grad(n * v);
  forward<float>(n, {s.data(), v, v}, {t.data(), v, v}, nullptr, o, loss.data(), stats.data(), state.data());
  backward<float>(n, g.data(), {s.data(), v, v}, {t.data(), v, v}, nullptr, state.data(), o, grad.data(), v);
  std::vector<float> loss2(n), stats2(n * kNumStats), state2(n * kRowState), grad2(n * v, 1.f);
  forward_backward<float>(n, {s.data(), v, v}, {t.data(), v, v}, nullptr, g.data(), o, loss2.data(), stats2.data(),
                          state2.data(), grad2.data(), v);
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] == 0.f) {
      EXPECT_EQ(loss2[i], 0.f);
      for (int k = 0; k < kNumStats; ++k) EXPECT_TRUE(std::isnan(stats2[i * kNumStats + k]));
      for (int64_t j = 0; j < v; ++j) ASSERT_EQ(grad2[i * v + j], 0.f);
      continue;
    }
    // The fused op keeps the row's probabilities from its forward for its backward: one rounding apart, and
    // an entry q (g - <q, g>) that cancels keeps that rounding (how much shows depends on the vector width):
    // within 1e-6 relative or 1e-6 of the row's largest entry.
    EXPECT_NEAR(loss2[i], loss[i], 1e-6f * std::fabs(loss[i]));
    for (int k = 0; k < kNumStats; ++k) EXPECT_EQ(std::isnan(stats2[i * kNumStats + k]), std::isnan(stats[i * kNumStats + k]));
    float row_max = 0.f;
    for (int64_t j = 0; j < v; ++j) row_max = std::max(row_max, std::fabs(grad[i * v + j]));
    for (int64_t j = 0; j < v; ++j)
      ASSERT_NEAR(grad2[i * v + j], grad[i * v + j], 1e-6f * (std::fabs(grad[i * v + j]) + row_max)) << i << " " << j;
  }
}

TEST(DistillCpu, HalfAndBFloat16RoundTrip) {
  for (float f : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f, 1e-3f, 3.14159f}) {
    EXPECT_EQ(half_to_float(float_to_half(f)), f == 3.14159f ? 3.140625f : (f == 1e-3f ? 0.0010004044f : f)) << f;
  }
  EXPECT_TRUE(std::isinf(half_to_float(float_to_half(1e6f))));
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.f)), 1.f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.00390625f)), 1.f);       // tie rounds to even
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.01171875f)), 1.015625f);  // tie rounds to even (up)
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(-INFINITY))));
}
