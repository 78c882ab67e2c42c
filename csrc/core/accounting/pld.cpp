#include "pld.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "log_math.h"
#include "rdp.h"

namespace dpkd::accounting {

namespace {

// exp(t1) - exp(t2) for t2 <= t1, clamped at 0 (rounding can put t2 a hair above t1).
double exp_difference(double t1, double t2) {
  if (t1 == -kInf) return 0.0;
  const double d = std::exp(t1) * -std::expm1(t2 - t1);
  return d > 0.0 ? d : 0.0;
}

// The loss of the remove direction at x: log((1 - q) + q exp((2x - 1) / (2 sigma^2))); the add direction's is its
// negative (with x drawn from N(0, sigma^2) instead of the mixture).
double remove_loss(double sigma, double q, double x) {
  return log_add(std::log1p(-q), std::log(q) + (2.0 * x - 1.0) / (2.0 * sigma * sigma));
}

// z with P(N(0, 1) > z) = p, by bisection on log_ndtr (p in (0, 1/2]).
double upper_quantile(double p) {
  double lo = 0.0, hi = 40.0;
  const double target = std::log(p);
  for (int i = 0; i < 200 && hi - lo > 1e-12; ++i) {
    const double mid = 0.5 * (lo + hi);
    (log_ndtr(-mid) > target ? lo : hi) = mid;
  }
  return hi;
}

// r(eps) = delta(eps) - (1 - e^eps) = e^eps Q(L <= eps) - P(L <= eps): the hockey-stick curve less its
// straight part, small where delta is close to 1 - e^eps (losses below eps are rare). The masses are second
// differences of delta in e^eps, which a straight line does not change: taken from r there, they keep the
// digits that delta's leading 1 - e^eps would round away (-1e-12 per grid point, clamped to +1e-12 of
// spurious mass each, 1e-8 per step over a wide grid).
double lower_tail_form(double sigma, double q, double eps, Adjacency adjacency) {
  const double log1m_q = std::log1p(-q);
  if (adjacency == Adjacency::kRemove) {
    if (eps <= log1m_q) return 0.0;
    const double log_excess = eps + std::log(-std::expm1(log1m_q - eps));
    const double x = sigma * sigma * (log_excess - std::log(q)) + 0.5;
    return exp_difference(log_excess + log_ndtr(x / sigma), std::log(q) + log_ndtr((x - 1.0) / sigma));
  }
  if (eps >= -log1m_q) return std::expm1(eps);
  const double log_room = std::log(-std::expm1(log1m_q + eps));
  const double x = sigma * sigma * (log_room - eps - std::log(q)) + 0.5;
  return exp_difference(eps + std::log(q) + log_ndtr((1.0 - x) / sigma), log_room + log_ndtr(-x / sigma));
}

}  // namespace

double gaussian_hockey_stick(double sigma, double q, double eps, Adjacency adjacency) {
  check_noise_multiplier(sigma);
  check_sample_rate(q);
  if (std::isnan(eps)) throw std::invalid_argument("epsilon must not be NaN");
  const double log1m_q = std::log1p(-q);  // -inf at q = 1
  if (q == 0.0) return eps >= 0.0 ? 0.0 : -std::expm1(eps);  // L = 0 everywhere
  if (adjacency == Adjacency::kRemove) {
    if (eps <= log1m_q) return -std::expm1(eps);  // below the smallest loss: 1 - e^eps
    // L > eps  <=>  x > x_eps; log(e^eps - (1 - q)) without cancelling
    const double log_excess = eps + std::log(-std::expm1(log1m_q - eps));
    if (sigma == 0.0) return q;  // x = 1 (probability q) has an infinite loss, x = 0 a loss below eps
    const double x = sigma * sigma * (log_excess - std::log(q)) + 0.5;
    return exp_difference(std::log(q) + log_ndtr(-(x - 1.0) / sigma), log_excess + log_ndtr(-x / sigma));
  }
  if (eps >= -log1m_q) return 0.0;  // the add direction's loss never exceeds -log(1 - q)
  const double log_room = std::log(-std::expm1(log1m_q + eps));  // log(1 - (1 - q) e^eps)
  if (sigma == 0.0) return std::exp(log_room);  // x = 0: L = -log(1 - q) with probability 1
  const double x = sigma * sigma * (log_room - eps - std::log(q)) + 0.5;
  return exp_difference(log_room + log_ndtr(x / sigma), eps + std::log(q) + log_ndtr((x - 1.0) / sigma));
}

DiscretePLD subsampled_gaussian_pld(double sigma, double q, double interval, double tail_mass, Adjacency adjacency) {
  check_noise_multiplier(sigma);
  check_sample_rate(q);
  if (!(std::isfinite(interval) && interval > 0.0))
    throw std::invalid_argument("value_discretization_interval must be finite and > 0, got " + number(interval));
  if (!(tail_mass > 0.0 && tail_mass < 1.0))
    throw std::invalid_argument("tail_mass must be in (0, 1), got " + number(tail_mass));
  DiscretePLD pld;
  if (sigma == 0.0 && q > 0.0) {
    // Remove: x = 0 (loss log(1 - q), rounded up) or x = 1 (loss inf, probability q). Add: loss -log(1 - q).
    const double loss = adjacency == Adjacency::kRemove ? std::log1p(-q) : -std::log1p(-q);
    const double mass = adjacency == Adjacency::kRemove ? 1.0 - q : 1.0;
    if (q == 1.0 || std::ceil(loss / interval) > double(int64_t(1) << 62)) {
      pld.masses = {0.0};
      pld.infinity_mass = 1.0;
    } else {
      pld.lower = int64_t(std::ceil(loss / interval));
      pld.masses = {mass};
      pld.infinity_mass = 1.0 - mass;
    }
    return pld;
  }
  // The losses of x within z sigma of the means carry all but tail_mass of P.
  double eps_lo = 0.0, eps_hi = 0.0;
  if (q > 0.0) {
    const double z = upper_quantile(tail_mass / 2.0);
    if (adjacency == Adjacency::kRemove) {
      eps_lo = remove_loss(sigma, q, -sigma * z);
      eps_hi = remove_loss(sigma, q, 1.0 + sigma * z);
    } else {
      eps_lo = -remove_loss(sigma, q, sigma * z);
      eps_hi = -remove_loss(sigma, q, -sigma * z);
    }
  }
  const double lower = std::floor(eps_lo / interval), upper = std::ceil(eps_hi / interval);
  if (!(upper - lower < double(int64_t(1) << 27)))
    throw std::invalid_argument("value_discretization_interval " + number(interval) +
                                " needs more than 2^27 grid points for the privacy losses of noise_multiplier " +
                                number(sigma) + " and sample_rate " + number(q) +
                                "; use a larger interval (or the RDP accountant)");
  pld.lower = int64_t(lower);
  const int64_t n = int64_t(upper - lower) + 1;
  std::vector<double> delta(n), rest(n);
  for (int64_t i = 0; i < n; ++i) {
    const double eps = (lower + double(i)) * interval;
    delta[i] = gaussian_hockey_stick(sigma, q, eps, adjacency);
    rest[i] = lower_tail_form(sigma, q, eps, adjacency);
  }
  pld.infinity_mass = delta[n - 1];
  pld.masses.resize(n);
  if (n == 1) {
    pld.masses[0] = 1.0 - delta[0];
    return pld;
  }
  // The masses whose hockey-stick curve, linear in e^eps between grid points, passes through every delta[i]:
  // each mass is the change of that curve's slope at its grid point (Algorithm 1 of the paper), from delta or
  // from r, whichever is smaller there.
  const double growth = std::expm1(interval), factor = std::exp(interval);
  pld.masses[0] = delta[0] <= rest[0] ? (1.0 - delta[0]) + (delta[1] - delta[0]) / growth
                                      : (rest[1] - rest[0]) / growth - rest[0];
  for (int64_t i = 1; i + 1 < n; ++i) {
    const std::vector<double>& f = delta[i] <= rest[i] ? delta : rest;
    pld.masses[i] = ((f[i + 1] - f[i]) - factor * (f[i] - f[i - 1])) / growth;
  }
  pld.masses[n - 1] = (delta[n - 2] - delta[n - 1]) / -std::expm1(-interval);
  // Rounding leaves masses of about -1e-16 where the true ones are smaller: 0 only adds mass (pessimistic).
  for (double& m : pld.masses) m = m > 0.0 ? m : 0.0;
  return pld;
}

}  // namespace dpkd::accounting
