#include "rdp.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "log_math.h"

namespace dpkd::accounting {
namespace {

// Fractional orders need many terms only when q is large and alpha is close to 1 (the tail decays
// like k^-(alpha + 2)); past this many the order has no bound (+inf), never a too-small one.
constexpr int kMaxSeriesTerms = 200000;
// A series stops once its terms are this far (in log space, ~1e-11) below the running sum; the
// tails alternate with decreasing magnitude, so the first omitted term bounds the error (added: never too low).
constexpr double kRelativeStop = -25.0;

// Positive and negative terms summed separately in log space.
struct SignedLogSum {
  double log_pos = -kInf, log_neg = -kInf;
  void add(double log_abs, bool positive) {
    if (positive) log_pos = log_add(log_pos, log_abs); else log_neg = log_add(log_neg, log_abs);
  }
  // log(pos - neg); +inf (no usable value) when the difference is not positive.
  double log_value() const {
    if (!(log_neg < log_pos)) return kInf;
    return log_pos + std::log1p(-std::exp(log_neg - log_pos));
  }
};

// log(exp(x) - 1) for x > 0.
double log_expm1(double x) { return x > 30.0 ? x + std::log1p(-std::exp(-x)) : std::log(std::expm1(x)); }

// log(1 + exp(x)): from log(A - 1) back to log A without losing A - 1's relative precision.
double softplus(double x) { return x > 0.0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }

double log_binomial(double n, double k) {
  return std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0);
}

// Integer orders: A - 1 = sum_{k>=2} C(a, k) (1-q)^(a-k) q^k expm1((k^2 - k) / (2 s^2)), since the
// binomial weights sum to 1. Every term is positive, so A - 1 keeps full relative precision
// however small q is (summing A itself would lose everything below 1e-16).
double log_a_integer(double q, double sigma, int64_t alpha) {
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  const double inv_2s2 = 1.0 / (2.0 * sigma * sigma);
  double log_a_minus_1 = -kInf;
  for (int64_t k = 2; k <= alpha; ++k) {
    const double dk = static_cast<double>(k);
    const double term = log_binomial(static_cast<double>(alpha), dk) + dk * log_q +
                        static_cast<double>(alpha - k) * log_1mq + log_expm1((dk * dk - dk) * inv_2s2);
    log_a_minus_1 = log_add(log_a_minus_1, term);
  }
  return softplus(log_a_minus_1);
}

// Fractional orders: the two-sided series of Mironov et al. (Section 3.3), split at z0 where
// q L(z0) = 1 - q, L the likelihood ratio. Region z <= z0 contributes
//   sum_k C(a,k) (1-q)^(a-k) q^k exp(c_k) Phi((z0 - k)/s),   c_k = (k^2 - k) / (2 s^2),
// region z > z0 contributes sum_k C(a,k) q^(a-k) (1-q)^k exp(c_(a-k)) Q((z0 - a + k)/s).
// For q < 1/4 we subtract 1 = sum_k C(a,k) (1-q)^(a-k) q^k Phi(z0/s) + Q(z0/s) term by term, so
// the series gives A - 1 directly (same reason as for integer orders); above, A - 1 is not small
// and the plain series is accurate.
double log_a_fractional(double q, double sigma, double alpha) {
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  const double inv_2s2 = 1.0 / (2.0 * sigma * sigma);
  const double z0 = sigma * sigma * std::log(1.0 / q - 1.0) + 0.5;
  const double inv_s = 1.0 / sigma;
  auto log_upper_tail = [&](double x) { return log_erfc(x / std::sqrt(2.0)) - std::log(2.0); };  // log Q(x)
  const bool subtract_one = q < 0.25;
  const double log_q_z0 = log_upper_tail(z0 * inv_s);        // log Q(z0/s)
  const double log_phi_z0 = std::log1p(-std::exp(log_q_z0));  // log Phi(z0/s)

  SignedLogSum sum;
  if (subtract_one) sum.add(log_q_z0, false);
  double log_abs_coef = 0.0;  // log |C(a, 0)|
  bool coef_positive = true;
  for (int k = 0; k < kMaxSeriesTerms; ++k) {
    const double dk = k, j = alpha - dk;
    const double c_k = (dk * dk - dk) * inv_2s2, c_j = (j * j - j) * inv_2s2;
    const double log_w0 = log_abs_coef + dk * log_q + j * log_1mq;  // |C| (1-q)^(a-k) q^k
    const double log_w1 = log_abs_coef + j * log_q + dk * log_1mq;  // |C| q^(a-k) (1-q)^k
    const double log_s0 = log_w0 + c_k + log_upper_tail((dk - z0) * inv_s);  // Phi(x) = Q(-x)
    const double log_s1 = log_w1 + c_j + log_upper_tail((z0 - j) * inv_s);
    sum.add(log_s1, coef_positive);
    double log_largest = std::fmax(log_s0, log_s1);
    if (!subtract_one) {
      sum.add(log_s0, coef_positive);
    } else if (k >= 1) {  // k = 0: exp(c_0) Phi(z0/s) - Phi(z0/s) = 0
      // D_k = exp(c_k) Phi((z0-k)/s) - Phi(z0/s). While k <= z0 write it as
      // [expm1(c_k) + Q(z0/s)] - exp(c_k) Q((z0-k)/s), whose parts are far apart; past z0 the
      // direct form is the stable one (Phi((z0-k)/s) is small, exp(c_k) may be huge).
      double log_p, log_n;
      if (dk <= z0) {
        log_p = k >= 2 ? log_add(log_expm1(c_k), log_q_z0) : log_q_z0;
        log_n = c_k + log_upper_tail((z0 - dk) * inv_s);
      } else {
        log_p = c_k + log_upper_tail((dk - z0) * inv_s);
        log_n = log_phi_z0;
      }
      const bool d_positive = log_p > log_n;
      const double hi = std::fmax(log_p, log_n), lo = std::fmin(log_p, log_n);
      if (lo < hi) sum.add(log_w0 + hi + std::log1p(-std::exp(lo - hi)), d_positive == coef_positive);
      log_largest = std::fmax(log_largest, log_w0 + log_phi_z0);
    }
    if (dk > alpha && log_largest - sum.log_pos < kRelativeStop) {
      // The omitted tails of the two series are bounded by their first terms, each below this step's largest: add
      // both, so that A comes out an upper bound (at q >= 1/4, where the plain series sums A, the stop's ~1e-11 of A
      // is up to 5e-8 of a small A - 1, and leaving it out made the RDP that much too low).
      sum.add(log_largest + std::log(2.0), true);
      const double value = sum.log_value();
      return subtract_one ? softplus(value) : value;
    }
    // C(a, k + 1) = C(a, k) (a - k) / (k + 1)
    const double ratio = (alpha - dk) / (dk + 1.0);
    if (ratio < 0) coef_positive = !coef_positive;
    log_abs_coef += std::log(std::fabs(ratio));
  }
  return kInf;
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

std::vector<double> default_orders() {
  std::vector<double> orders;
  for (int x = 11; x <= 109; ++x) orders.push_back(x / 10.0);
  for (int x = 11; x <= 63; ++x) orders.push_back(x);
  for (double x : {128.0, 256.0, 512.0, 1024.0}) orders.push_back(x);
  return orders;
}

double log_a(double sample_rate, double noise_multiplier, double order) {
  if (order == std::floor(order) && order < 1e6) {
    return log_a_integer(sample_rate, noise_multiplier, static_cast<int64_t>(order));
  }
  return log_a_fractional(sample_rate, noise_multiplier, order);
}

double rdp_one_step(double sample_rate, double noise_multiplier, double order) {
  if (sample_rate == 0.0) return 0.0;
  if (noise_multiplier == 0.0 || std::isinf(order)) return kInf;
  const double unsubsampled = order / (2.0 * noise_multiplier * noise_multiplier);
  if (sample_rate == 1.0) return unsubsampled;
  const double value = log_a(sample_rate, noise_multiplier, order) / (order - 1.0);
  // Subsampling never costs privacy; the bound also caps rounding at huge orders.
  return std::fmin(value, unsubsampled);
}

std::vector<double> rdp(double sample_rate, double noise_multiplier, const std::vector<double>& orders) {
  check_sample_rate(sample_rate);
  check_noise_multiplier(noise_multiplier);
  check_orders(orders);
  std::vector<double> out(orders.size());
  for (size_t k = 0; k < orders.size(); ++k) out[k] = rdp_one_step(sample_rate, noise_multiplier, orders[k]);
  return out;
}

std::vector<double> rdp_of_events(const std::vector<GaussianEvent>& events,
                                  const std::vector<double>& orders) {
  check_orders(orders);
  std::vector<double> total(orders.size(), 0.0);
  for (const GaussianEvent& e : events) {
    check_sample_rate(e.sample_rate);
    check_noise_multiplier(e.noise_multiplier);
    check_steps(e.count);
    if (e.count == 0) continue;
    for (size_t k = 0; k < orders.size(); ++k) {
      const double r = rdp_one_step(e.sample_rate, e.noise_multiplier, orders[k]);
      // 0 * inf stays 0: a zero-rate event costs nothing however large the order.
      if (r != 0.0) total[k] += static_cast<double>(e.count) * r;
    }
  }
  return total;
}

void check_sample_rate(double sample_rate) {
  if (!(sample_rate >= 0.0 && sample_rate <= 1.0))
    fail("sample_rate must be in [0, 1], got " + number(sample_rate));
}

void check_noise_multiplier(double noise_multiplier) {
  if (!(noise_multiplier >= 0.0) || std::isinf(noise_multiplier))
    fail("noise_multiplier must be finite and >= 0, got " + number(noise_multiplier));
}

void check_steps(int64_t steps, const char* name) {
  if (steps < 0) fail(std::string(name) + " must be >= 0, got " + std::to_string(steps));
}

void check_delta(double delta) {
  if (!(delta > 0.0 && delta < 1.0)) fail("delta must be in (0, 1), got " + number(delta));
}

void check_orders(const std::vector<double>& orders) {
  if (orders.empty()) fail("orders must not be empty");
  for (double a : orders) {
    if (!(a > 1.0)) fail("orders must all be > 1, got " + number(a));
  }
}

}  // namespace dpkd::accounting
