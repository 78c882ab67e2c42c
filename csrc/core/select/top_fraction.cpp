#include "select/top_fraction.h"

#include <algorithm>
#include <cmath>

namespace dpkd::select {

void top_fraction_row(const float* score, const bool* valid, int64_t cols, double fraction, bool largest,
                      bool* selected, std::vector<std::pair<float, int64_t>>& scratch) {
  scratch.clear();
  for (int64_t j = 0; j < cols; ++j) {
    selected[j] = false;
    if (valid[j] && std::isfinite(score[j])) scratch.emplace_back(largest ? score[j] : -score[j], j);
  }
  const auto k = selected_count(fraction, static_cast<int64_t>(scratch.size()));
  if (k == 0) return;
  // The k first in the order (key descending, column ascending): a strict total order, so the selected set
  // is exactly the stable sort's first k.
  const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (k < static_cast<int64_t>(scratch.size())) std::nth_element(scratch.begin(), scratch.begin() + (k - 1),
                                                                 scratch.end(), before);
  for (int64_t i = 0; i < k; ++i) selected[scratch[i].second] = true;
}

void top_fraction_rows(const float* score, const bool* valid, int64_t rows, int64_t cols, double fraction,
                       bool largest, bool* selected) {
#pragma omp parallel if (rows > 1 && rows * cols > (1 << 16))
  {
    std::vector<std::pair<float, int64_t>> scratch;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      top_fraction_row(score + i * cols, valid + i * cols, cols, fraction, largest, selected + i * cols, scratch);
  }
}

}  // namespace dpkd::select
