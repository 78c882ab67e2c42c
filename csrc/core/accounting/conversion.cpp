#include "conversion.h"

#include <cmath>
#include <stdexcept>

#include "log_math.h"
#include "rdp.h"

namespace dpkd::accounting {

double epsilon_at_order(double order, double rdp, double delta, Conversion conversion) {
  if (!(rdp < kInf)) return kInf;  // +inf and NaN (no bound at this order)
  if (conversion == Conversion::kBasic) return rdp - std::log(delta) / (order - 1.0);
  // Then delta >= sqrt(1 - exp(-KL)) already holds: no privacy loss beyond delta.
  if (delta * delta + std::expm1(-rdp) > 0.0) return 0.0;
  // The bound is numerically unstable as order -> 1 and useless there anyway.
  if (order <= 1.01) return kInf;
  return rdp + std::log1p(-1.0 / order) - std::log(delta * order) / (order - 1.0);
}

EpsilonAtOrder epsilon_from_rdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                                double delta, Conversion conversion) {
  check_orders(orders);
  check_delta(delta);
  if (rdp.size() != orders.size())
    throw std::invalid_argument("rdp must have one value per order: got " + std::to_string(rdp.size()) +
                                " values for " + std::to_string(orders.size()) + " orders");
  EpsilonAtOrder best{kInf, std::nan("")};
  for (size_t k = 0; k < orders.size(); ++k) {
    if (rdp[k] < 0.0) throw std::invalid_argument("rdp must be >= 0 at every order");
    const double eps = epsilon_at_order(orders[k], rdp[k], delta, conversion);
    if (eps < best.epsilon) best = {eps, orders[k]};
  }
  if (best.epsilon < 0.0) best.epsilon = 0.0;
  return best;
}

}  // namespace dpkd::accounting
