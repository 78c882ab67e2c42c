#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "select/top_fraction.h"

namespace dpkd::select {
namespace {

// The definition: stable sort of the valid columns by score (descending, or ascending for !largest), first k.
std::vector<bool> by_sorting(const std::vector<float>& score, const std::vector<bool>& valid, double fraction,
                             bool largest) {
  std::vector<int64_t> idx;
  for (size_t j = 0; j < score.size(); ++j)
    if (valid[j]) idx.push_back(static_cast<int64_t>(j));
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return largest ? score[a] > score[b] : score[a] < score[b];
  });
  std::vector<bool> out(score.size(), false);
  const auto k = static_cast<size_t>(std::ceil(fraction * static_cast<double>(idx.size()) - 1e-9));
  for (size_t i = 0; i < std::min(k, idx.size()); ++i) out[idx[i]] = true;
  return out;
}

TEST(SelectTopFraction, CountHasSlackForWholeNumbers) {
  EXPECT_EQ(selected_count(0.07, 100), 7);  // 0.07 * 100 = 7.000000000000001
  EXPECT_EQ(selected_count(0.071, 100), 8);
  EXPECT_EQ(selected_count(0.5, 7), 4);
  EXPECT_EQ(selected_count(0.0, 9), 0);
  EXPECT_EQ(selected_count(1.0, 9), 9);
  EXPECT_EQ(selected_count(0.3, 0), 0);
  // 0.56 * 34952550 rounds to 19573428.000000004: a fused multiply-subtract would give 19573428.
  EXPECT_EQ(selected_count(0.56, 34952550), 19573429);
}

TEST(SelectTopFraction, EqualsStableSortWithTiesAndPadding) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> level(0, 4);  // few distinct values: many ties
  std::bernoulli_distribution keep(0.7);
  std::vector<std::pair<float, int64_t>> scratch;
  for (int cols : {1, 2, 13, 100, 1031}) {
    for (double fraction : {0.0, 0.1, 0.5, 0.77, 1.0}) {
      for (bool largest : {true, false}) {
        std::vector<float> score(cols);
        std::vector<bool> valid(cols);
        bool valid_raw[1031], selected[1031];
        for (int j = 0; j < cols; ++j) {
          score[j] = level(rng) == 0 ? -0.0f : 0.25f * static_cast<float>(level(rng));  // -0 ties +0
          valid[j] = valid_raw[j] = keep(rng);
        }
        top_fraction_row(score.data(), valid_raw, cols, fraction, largest, selected, scratch);
        const auto expected = by_sorting(score, valid, fraction, largest);
        for (int j = 0; j < cols; ++j)
          ASSERT_EQ(selected[j], expected[j]) << "cols " << cols << " fraction " << fraction << " column " << j;
      }
    }
  }
}

TEST(SelectTopFraction, NonFiniteScoresAreNotValid) {
  const float score[5] = {NAN, 1.0f, INFINITY, -INFINITY, 2.0f};
  const bool valid[5] = {true, true, true, true, true};
  bool selected[5];
  std::vector<std::pair<float, int64_t>> scratch;
  top_fraction_row(score, valid, 5, 1.0, true, selected, scratch);
  EXPECT_TRUE(!selected[0] && selected[1] && !selected[2] && !selected[3] && selected[4]);
}

TEST(SelectTopFraction, NoValidEntriesSelectsNothing) {
  const float score[3] = {1.0f, 2.0f, 3.0f};
  const bool valid[3] = {false, false, false};
  bool selected[3] = {true, true, true};
  std::vector<std::pair<float, int64_t>> scratch;
  top_fraction_row(score, valid, 3, 1.0, true, selected, scratch);
  EXPECT_FALSE(selected[0] || selected[1] || selected[2]);
}

}  // namespace
}  // namespace dpkd::select
