// From RDP to (epsilon, delta)-DP.
#pragma once

#include <vector>

namespace dpkd::accounting {

enum class Conversion {
  // Balle et al. 2020 ("Hypothesis testing interpretations and Renyi DP"), Prop. 12, with
  // dp_accounting's guards: orders <= 1.01 give no bound; eps = 0 when delta^2 + expm1(-r) > 0.
  kImproved,
  // Mironov 2017, Prop. 3: eps = r - log(delta) / (alpha - 1).
  kBasic,
};

struct EpsilonAtOrder {
  double epsilon;  // +inf when no order gives a finite bound
  double order;    // the minimising order; NaN when epsilon is +inf
};

// Epsilon at one order (no argument checks).
double epsilon_at_order(double order, double rdp, double delta, Conversion conversion);

// min over orders, clamped at 0.
EpsilonAtOrder epsilon_from_rdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                                double delta, Conversion conversion = Conversion::kImproved);

}  // namespace dpkd::accounting
