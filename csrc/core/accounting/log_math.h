// Log-space arithmetic shared by the accountants: sums of huge or tiny positive terms
// without overflow or underflow; and numbers for their error messages.
#pragma once

#include <charconv>
#include <cmath>
#include <limits>
#include <string>

namespace dpkd::accounting {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)).
inline double log_add(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  return hi + std::log1p(std::exp(lo - hi));
}

// log(erfc(x)), accurate where erfc(x) underflows (x > 26): asymptotic series
// erfc(x) = exp(-x^2) / (x sqrt(pi)) * sum_k (-1)^k (2k-1)!! / (2x^2)^k.
double log_erfc(double x);

// log(Phi(x)) for the standard normal CDF.
inline double log_ndtr(double x) { return log_erfc(-x / std::sqrt(2.0)) - std::log(2.0); }

// A number for an error message: the shortest text that reads back as it (std::to_string's %f shows 1e-300 as
// 0.000000).
inline std::string number(double v) {
  char text[32];
  return std::string(text, std::to_chars(text, text + sizeof text, v).ptr);
}

}  // namespace dpkd::accounting
