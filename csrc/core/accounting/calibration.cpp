#include "calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>

#include "log_math.h"
#include "rdp.h"

namespace dpkd::accounting {
namespace {

// Epsilon over a subset of the orders (indices into `orders`), and the index of the best one.
struct Best {
  double epsilon;
  size_t index;
};

Best epsilon_over(const std::vector<double>& orders, const std::vector<size_t>& subset, double sigma,
                  double q, int64_t steps, double delta, Conversion conversion) {
  Best best{kInf, subset.front()};
  for (size_t k : subset) {
    const double r = static_cast<double>(steps) * rdp_one_step(q, sigma, orders[k]);
    const double eps = epsilon_at_order(orders[k], r, delta, conversion);
    if (eps < best.epsilon) best = {eps, k};
  }
  best.epsilon = std::max(best.epsilon, 0.0);
  return best;
}

// g decreasing in x; g(bad) > 0 >= g(good), bad < good. Brent's method (Brent 1973, "zero"),
// keeping the tightest bracket seen: returns it once good - bad <= rtol * good.
template <class G>
void brent_shrink(const G& g, double& bad, double g_bad, double& good, double g_good, double rtol) {
  auto eval = [&](double x) {
    const double gx = g(x);
    if (gx > 0) bad = std::max(bad, x); else good = std::min(good, x);
    return gx;
  };
  double a = bad, fa = g_bad, b = good, fb = g_good, c = a, fc = fa;
  double d = b - a, e = d;
  for (int iter = 0; iter < 300 && good - bad > rtol * good; ++iter) {
    if ((fb > 0) == (fc > 0)) { c = a; fc = fa; d = e = b - a; }
    if (std::fabs(fc) < std::fabs(fb)) { a = b; b = c; c = a; fa = fb; fb = fc; fc = fa; }
    const double tol = 2.0 * std::numeric_limits<double>::epsilon() * std::fabs(b) + 0.25 * rtol * std::fabs(b);
    const double m = 0.5 * (c - b);
    if (std::fabs(m) <= tol || fb == 0.0) break;
    if (std::fabs(e) >= tol && std::fabs(fa) > std::fabs(fb) && std::isfinite(fa) && std::isfinite(fc)) {
      const double s = fb / fa;
      double p, q;
      if (a == c) {
        p = 2.0 * m * s; q = 1.0 - s;
      } else {
        const double qq = fa / fc, r = fb / fc;
        p = s * (2.0 * m * qq * (qq - r) - (b - a) * (r - 1.0));
        q = (qq - 1.0) * (r - 1.0) * (s - 1.0);
      }
      if (p > 0) q = -q; else p = -p;
      if (2.0 * p < std::min(3.0 * m * q - std::fabs(tol * q), std::fabs(e * q))) { e = d; d = p / q; }
      else { d = m; e = m; }
    } else {
      d = m; e = m;
    }
    a = b; fa = fb;
    b += std::fabs(d) > tol ? d : (m > 0 ? tol : -tol);
    fb = eval(b);
  }
  // Brent stops on |c - b| but the kept bracket may still be wide after a degenerate step: bisect.
  while (good - bad > rtol * good) eval(0.5 * (bad + good));
}

void add_neighbourhood(std::set<size_t>& subset, size_t k, size_t n) {
  for (size_t j = (k >= 2 ? k - 2 : 0); j <= std::min(n - 1, k + 2); ++j) subset.insert(j);
}

void check_common(double delta, double sample_rate, int64_t steps, const std::vector<double>& orders) {
  check_delta(delta);
  check_sample_rate(sample_rate);
  check_steps(steps);
  check_orders(orders);
}

}  // namespace

void check_target_epsilon(double target_epsilon) {
  if (!(target_epsilon > 0.0) || std::isinf(target_epsilon))
    throw std::invalid_argument("target_epsilon must be finite and > 0, got " + number(target_epsilon));
}

EpsilonAtOrder epsilon(double noise_multiplier, double sample_rate, int64_t steps, double delta,
                       const std::vector<double>& orders, Conversion conversion) {
  check_noise_multiplier(noise_multiplier);
  check_common(delta, sample_rate, steps, orders);
  return epsilon_from_rdp(orders, rdp_of_events({{noise_multiplier, sample_rate, steps}}, orders), delta,
                          conversion);
}

double calibrate_noise(double target_epsilon, double delta, double sample_rate, int64_t steps,
                       const std::vector<double>& orders, Conversion conversion) {
  check_target_epsilon(target_epsilon);
  check_common(delta, sample_rate, steps, orders);
  if (steps == 0 || sample_rate == 0.0) return 0.0;

  std::vector<size_t> all(orders.size());
  for (size_t k = 0; k < all.size(); ++k) all[k] = k;
  auto full = [&](double sigma) {
    return epsilon_over(orders, all, sigma, sample_rate, steps, delta, conversion);
  };

  // Bracket by doubling from sigma = 1: epsilon(bad) > target >= epsilon(good).
  double bad = 0.0, good = 1.0;
  Best at = full(good);
  if (at.epsilon > target_epsilon) {
    while (at.epsilon > target_epsilon) {
      bad = good;
      good *= 2.0;
      if (good > 1e8) throw std::invalid_argument("target_epsilon is unreachable with noise_multiplier <= 1e8");
      at = full(good);
    }
  } else {
    for (double sigma = 0.5; sigma > 1e-8; sigma *= 0.5) {
      const Best below = full(sigma);
      if (below.epsilon > target_epsilon) { bad = sigma; break; }
      good = sigma;
      at = below;
    }
  }
  if (bad == 0.0) return good;  // epsilon <= target even at sigma = 1e-8

  std::set<size_t> subset_set;
  add_neighbourhood(subset_set, at.index, orders.size());
  const double rtol = 1e-10;
  for (;;) {
    const std::vector<size_t> subset(subset_set.begin(), subset_set.end());
    auto g = [&](double sigma) {
      return epsilon_over(orders, subset, sigma, sample_rate, steps, delta, conversion).epsilon - target_epsilon;
    };
    // The subset's epsilon is >= the full grid's, so `bad` stays bad; `good` is good for the subset
    // because the best order there belongs to it.
    double sub_bad = bad, sub_good = good;
    brent_shrink(g, sub_bad, g(bad), sub_good, g(good), rtol);
    // If no other order makes sub_bad good, the subset's answer is the grid's answer.
    const Best check = full(sub_bad);
    if (check.epsilon > target_epsilon) return sub_good;
    good = sub_bad;
    add_neighbourhood(subset_set, check.index, orders.size());
  }
}

int64_t max_steps(double target_epsilon, double delta, double noise_multiplier, double sample_rate,
                  const std::vector<double>& orders, Conversion conversion) {
  check_target_epsilon(target_epsilon);
  check_noise_multiplier(noise_multiplier);
  check_common(delta, sample_rate, 0, orders);
  constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();
  if (sample_rate == 0.0) return kUnlimited;
  const std::vector<double> per_step = rdp(sample_rate, noise_multiplier, orders);
  auto eps_of = [&](int64_t steps) {
    std::vector<double> total(per_step.size());
    for (size_t k = 0; k < total.size(); ++k) total[k] = per_step[k] == 0.0 ? 0.0 : steps * per_step[k];
    return epsilon_from_rdp(orders, total, delta, conversion).epsilon;
  };
  // epsilon(n) <= target iff some order has epsilon_at_order(alpha, n r) <= target, and each order's
  // epsilon is affine in n (or 0 below the delta guard): solve per order and take the largest n.
  double best = 0.0;
  for (size_t k = 0; k < orders.size(); ++k) {
    const double r = per_step[k], a = orders[k];
    if (r == 0.0) return kUnlimited;
    if (!(r < kInf)) continue;
    double n;
    if (conversion == Conversion::kBasic) {
      n = std::floor((target_epsilon + std::log(delta) / (a - 1.0)) / r);
    } else {
      // Below the guard epsilon is 0: n r < -log(1 - delta^2).
      n = std::ceil(-std::log1p(-delta * delta) / r) - 1.0;
      if (a > 1.01)
        n = std::max(n, std::floor((target_epsilon - std::log1p(-1.0 / a) + std::log(delta * a) / (a - 1.0)) / r));
    }
    best = std::max(best, n);
  }
  if (best >= 9.2e18) return kUnlimited;
  auto steps = static_cast<int64_t>(best);
  // The closed form can be off by one in floating point; settle it exactly.
  while (steps > 0 && eps_of(steps) > target_epsilon) --steps;
  while (steps < kUnlimited && eps_of(steps + 1) <= target_epsilon) ++steps;
  return steps;
}

double gdp_mu(double noise_multiplier, double sample_rate, int64_t steps) {
  check_noise_multiplier(noise_multiplier);
  check_sample_rate(sample_rate);
  check_steps(steps);
  if (sample_rate == 0.0 || steps == 0) return 0.0;
  if (noise_multiplier == 0.0) return kInf;
  return sample_rate * std::sqrt(static_cast<double>(steps) * std::expm1(1.0 / (noise_multiplier * noise_multiplier)));
}

double gdp_delta(double mu, double epsilon) {
  if (mu == 0.0) return 0.0;
  return std::exp(log_ndtr(-epsilon / mu + mu / 2.0)) - std::exp(epsilon + log_ndtr(-epsilon / mu - mu / 2.0));
}

double gdp_epsilon(double mu, double delta) {
  check_delta(delta);
  if (!(mu >= 0.0)) throw std::invalid_argument("mu must be >= 0");
  if (!(mu < kInf)) return kInf;
  if (gdp_delta(mu, 0.0) <= delta) return 0.0;
  // delta(eps) decreases in eps: bracket, then bisect to full precision.
  double lo = 0.0, hi = 1.0;
  while (gdp_delta(mu, hi) > delta) {
    lo = hi;
    hi *= 2.0;
    if (hi > 1e6) return kInf;
  }
  for (int i = 0; i < 200 && hi - lo > 1e-13 * hi; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (gdp_delta(mu, mid) > delta) lo = mid; else hi = mid;
  }
  return hi;
}

}  // namespace dpkd::accounting
