// Epsilon of repeated Poisson-subsampled Gaussian steps, and the inverse problems: the smallest
// noise multiplier for a target epsilon, and the largest number of steps for a noise multiplier.
#pragma once

#include <cstdint>
#include <vector>

#include "conversion.h"

namespace dpkd::accounting {

// (epsilon, best order) of `steps` identical steps.
EpsilonAtOrder epsilon(double noise_multiplier, double sample_rate, int64_t steps, double delta,
                       const std::vector<double>& orders, Conversion conversion = Conversion::kImproved);

// The smallest noise multiplier whose epsilon is <= target_epsilon, to a relative tolerance of
// about 1e-9; the returned sigma always satisfies epsilon(sigma) <= target_epsilon. Brent's method
// runs on a few orders near the optimum; the full grid is consulted only to check that no other
// order would allow a smaller sigma. 0 when the steps cost nothing (steps = 0 or sample_rate = 0).
double calibrate_noise(double target_epsilon, double delta, double sample_rate, int64_t steps,
                       const std::vector<double>& orders, Conversion conversion = Conversion::kImproved);

// The largest number of steps whose epsilon is <= target_epsilon (closed form per order, then
// checked). INT64_MAX when steps cost nothing (sample_rate = 0).
int64_t max_steps(double target_epsilon, double delta, double noise_multiplier, double sample_rate,
                  const std::vector<double>& orders, Conversion conversion = Conversion::kImproved);

// Gaussian DP through the central limit theorem (Bu, Dong, Long, Su 2019):
// mu = q sqrt(T (exp(1/sigma^2) - 1)). An approximation that can UNDER-estimate epsilon, most of all
// for few steps or large q; report it beside an RDP or PLD bound, never alone.
double gdp_mu(double noise_multiplier, double sample_rate, int64_t steps);
// delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2).
double gdp_delta(double mu, double epsilon);
// The epsilon of mu-GDP at delta (0 when delta(0) <= delta).
double gdp_epsilon(double mu, double delta);

void check_target_epsilon(double target_epsilon);

}  // namespace dpkd::accounting
