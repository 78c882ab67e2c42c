#include "log_math.h"

namespace dpkd::accounting {

double log_erfc(double x) {
  if (x < 25.0) return std::log(std::erfc(x));
  // Beyond 25 the first omitted term of the series is below 1e-18 relative.
  const double r = 1.0 / (2.0 * x * x);
  double term = 1.0, series = 1.0;
  for (int k = 1; k <= 8; ++k) {
    term *= -(2.0 * k - 1.0) * r;
    series += term;
  }
  return -x * x - std::log(x) - 0.5 * std::log(M_PI) + std::log(series);
}

}  // namespace dpkd::accounting
