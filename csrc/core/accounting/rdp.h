// Renyi differential privacy of the Poisson-subsampled Gaussian mechanism
// (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism").
#pragma once

#include <cstdint>
#include <vector>

namespace dpkd::accounting {

// One kind of step, repeated: `count` steps with noise multiplier sigma and sample rate q.
// Privacy events are plain data; accountants compose them.
struct GaussianEvent {
  double noise_multiplier;
  double sample_rate;
  int64_t count;
};

// The default order grid: 1.1 ... 10.9 (step 0.1), 11 ... 63, 128, 256, 512, 1024.
std::vector<double> default_orders();

// log A_alpha for one step, A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha].
// Integer orders: the binomial sum. Fractional orders: the signed two-sided series, stopped when a
// term falls 1e-16 below the running sum; returns +inf when the series does not converge within
// the iteration cap (so the order is dropped downstream, never under-reported).
double log_a(double sample_rate, double noise_multiplier, double order);

// RDP epsilon of one step at `order` (not validated; see check_* below). Special cases:
// q = 0 -> 0, sigma = 0 -> inf, q = 1 -> order / (2 sigma^2). Never above the unsubsampled value.
double rdp_one_step(double sample_rate, double noise_multiplier, double order);

// RDP of one step at each order.
std::vector<double> rdp(double sample_rate, double noise_multiplier, const std::vector<double>& orders);

// RDP of a composition: the per-step vectors times their counts, added.
std::vector<double> rdp_of_events(const std::vector<GaussianEvent>& events,
                                  const std::vector<double>& orders);

// Argument checks: throw std::invalid_argument naming the argument.
void check_sample_rate(double sample_rate);
void check_noise_multiplier(double noise_multiplier);
void check_steps(int64_t steps, const char* name = "steps");
void check_delta(double delta);
void check_orders(const std::vector<double>& orders);

}  // namespace dpkd::accounting
