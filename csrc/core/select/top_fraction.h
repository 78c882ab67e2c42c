// Per-sequence token selection: the top fraction of a row's valid scores (python/dpkd/select.py).
#pragma once

#include <math.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "host_device.h"

namespace dpkd::select {

// ceil(fraction * n), with a 1e-9 slack so that a fraction meant to give a whole number does (0.07 of
// 100 is 7, though 0.07 * 100 = 7.000000000000001 in binary floating point). fraction in [0, 1].
DPKD_HOST_DEVICE int64_t selected_count(double fraction, int64_t n) {
  // The product rounded, then the difference, as PyTorch computes it elementwise (select.py's fallback):
  // compilers would otherwise fuse the two into an fma at will, and the counts could differ for large n.
#ifdef __CUDA_ARCH__
  const double product = __dmul_rn(fraction, static_cast<double>(n));
#else
  const volatile double product = fraction * static_cast<double>(n);  // a store: never fused
#endif
  const auto k = static_cast<int64_t>(ceil(product - 1e-9));
  return k < 0 ? 0 : (k > n ? n : k);
}

// Marks in selected[0, cols) the selected_count(fraction, n) highest scores (lowest if !largest) among the
// row's n valid entries (valid[j] and a finite score), ties to the earlier column; every other entry is
// cleared. O(cols) expected: a selection, not a sort. `scratch` is reused across rows.
void top_fraction_row(const float* score, const bool* valid, int64_t cols, double fraction, bool largest,
                      bool* selected, std::vector<std::pair<float, int64_t>>& scratch);

// top_fraction_row over `rows` contiguous rows of `cols`, rows in parallel.
void top_fraction_rows(const float* score, const bool* valid, int64_t rows, int64_t cols, double fraction,
                       bool largest, bool* selected);

}  // namespace dpkd::select
