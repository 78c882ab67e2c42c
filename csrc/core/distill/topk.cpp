#include "distill/topk.h"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "distill/tile_math.h"
#include "distill/topk_math.h"

namespace dpkd::distill {
namespace {

using namespace tiles;

// One thread's work space for a row: its raw logits as float (-inf on the ids and past the vocabulary), the exps
// of the rest's tempered logits (each tile's relative to the running maximum recorded for it), and the ids' terms.
struct RowSpace {
  std::vector<float> z, e, tile_max, z_k;
  std::vector<double> lq_k, h_k;
  std::vector<int64_t> sorted_ids;
  void reset(int64_t vocab, int64_t k) {
    const size_t width = static_cast<size_t>((vocab + kTile - 1) / kTile * kTile);
    z.resize(width);
    e.resize(width);
    tile_max.resize(width / kTile);
    z_k.resize(static_cast<size_t>(k));
    lq_k.resize(static_cast<size_t>(k));
    h_k.resize(static_cast<size_t>(k));
    sorted_ids.resize(static_cast<size_t>(k));
  }
};

// label: -1 where the row has none. g_out: the row's upstream gradient (grad == nullptr: loss and statistics only).
template <class T>
void topk_row(const T* x, int64_t vocab, const int64_t* ids, const float* lp, const TopKTeacher& teacher,
              int64_t label, float g_out, const RowOptions& o, float* loss, float* stats, T* grad, RowSpace& ws) {
  const int64_t k = teacher.k, width = static_cast<int64_t>(ws.z.size());
  const float inv_t = 1.f / o.temperature;
  const double w = o.hard_label_weight;
  const bool has_label = label >= 0, raw_needed = has_label && w > 0 && o.temperature != 1.f;
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();

  // Pass 1 (reads the logits): the row as float, NaN / +inf seen, and the raw log-sum-exp of the hard-label term.
  bool student_bad = false;
  OnlineSoftmax raw;
  for (int64_t j0 = 0; j0 < width; j0 += kTile) {
    Eigen::Map<Tile> z(ws.z.data() + j0);
    if (j0 + kTile <= vocab) {
      for (int64_t c = 0; c < kTile; ++c) z[c] = load(x[j0 + c]);
    } else {
      for (int64_t c = 0; c < kTile; ++c) z[c] = j0 + c < vocab ? load(x[j0 + c]) : -INFINITY;
    }
    student_bad |= !(z.maxCoeff<Eigen::PropagateNaN>() < INFINITY);
    if (raw_needed) raw.add(z);
  }
  const float z_label = has_label ? ws.z[label] : -INFINITY;

  // The ids' logits out of the row. A faulty teacher row (an id out of range or repeated, or topk_math.h's faults) is
  // NaN in its loss and gradient.
  std::copy(ids, ids + k, ws.sorted_ids.begin());
  std::sort(ws.sorted_ids.begin(), ws.sorted_ids.end());
  bool teacher_nan = std::adjacent_find(ws.sorted_ids.begin(), ws.sorted_ids.end()) != ws.sorted_ids.end();
  double mass = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const bool in_range = ids[i] >= 0 && ids[i] < vocab;
    teacher_nan |= !in_range || logprob_faulty(lp[i]);
    ws.z_k[i] = in_range ? ws.z[ids[i]] : -INFINITY;
    mass += std::exp(static_cast<double>(lp[i]));
  }
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] >= 0 && ids[i] < vocab) ws.z[ids[i]] = -INFINITY;
  }

  // Pass 2 (work space): the rest's log-sum-exp and entropy sum over the tempered logits x = z / T.
  OnlineSoftmax rest;
  for (int64_t j0 = 0; j0 < width; j0 += kTile) {
    rest.add(Tile(Eigen::Map<const Tile>(ws.z.data() + j0) * inv_t), true, nullptr, ws.e.data() + j0);
    ws.tile_max[j0 / kTile] = rest.max;
  }

  // The row's normaliser from the rest and the ids, in double: log q_o = (x_o - max) - log_s.
  double max_x = rest.max;
  for (int64_t i = 0; i < k; ++i) max_x = std::fmax(max_x, static_cast<double>(ws.z_k[i] * inv_t));
  student_bad |= !(max_x > -INFINITY);
  double sum_k = 0.0, centered_k = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double shift = static_cast<double>(ws.z_k[i] * inv_t) - max_x, e = std::exp(shift);
    sum_k += e;
    centered_k += e > 0.0 ? e * shift : 0.0;
  }
  const bool has_rest = rest.sum > 0.0;
  const double rest_shift = rest.max - max_x, rest_scale = has_rest ? std::exp(rest_shift) : 0.0;
  const double total = sum_k + rest_scale * rest.sum, log_s = std::log(total);
  const double entropy_s =
      log_s - (centered_k + (has_rest ? rest_scale * (rest.centered + rest_shift * rest.sum) : 0.0)) / total;
  const double lq_rest = has_rest ? rest_shift + std::log(rest.sum) - log_s : -INFINITY;
  for (int64_t i = 0; i < k; ++i) ws.lq_k[i] = (static_cast<double>(ws.z_k[i] * inv_t) - max_x) - log_s;

  // The divergence over the K + 1 outcomes.
  const Divergence d = effective_divergence(o.objective);
  teacher_nan |= mass_faulty(mass, teacher.tail, d, k, vocab);
  const double lp_rest = teacher_log_tail(teacher.tail, k, vocab, mass);
  double div = 0.0, sum_h = 0.0, plogp = 0.0, teacher_label = lp_rest;
  for (int64_t i = 0; i < k; ++i) {
    const OutcomeTerms t = outcome_terms(d, o.objective, lp[i], ws.lq_k[i]);
    div += t.loss;
    sum_h += t.h;
    plogp += t.plogp;
    ws.h_k[i] = t.h;
    if (ids[i] == label) teacher_label = lp[i];
  }
  const OutcomeTerms r = outcome_terms(d, o.objective, lp_rest, lq_rest);
  div += r.loss;
  sum_h += r.h;
  plogp += r.plogp;

  // An infinite divergence (one that needs the tail, without it; the Python layer refuses that) has no gradient
  const bool row_nan = student_bad || teacher_nan, grad_nan = row_nan || !std::isfinite(sum_h);
  const double ce = raw_needed ? (raw.max + std::log(raw.sum)) - z_label : (max_x + log_s) - z_label;
  stats[kStudentEntropy] = static_cast<float>(student_bad ? nan : entropy_s);
  stats[kTeacherEntropy] = static_cast<float>(teacher_nan ? nan : -plogp);
  stats[kDivergence] = static_cast<float>(row_nan ? nan : div);
  stats[kStudentLabelLogprob] =
      static_cast<float>(has_label && !student_bad ? (static_cast<double>(z_label * inv_t) - max_x) - log_s : nan);
  stats[kTeacherLabelLogprob] = static_cast<float>(has_label && !teacher_nan ? teacher_label : nan);
  *loss = static_cast<float>((1.0 - w) * (row_nan ? nan : div) + (has_label ? w * ce : 0.0));
  if (grad == nullptr) return;

  // The gradient: a row without weight gets 0 (also where its logits are not finite), a faulty row NaN.
  if (g_out == 0.f || grad_nan) {
    const T fill = store<T>(g_out == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN());
    for (int64_t j = 0; j < vocab; ++j) grad[j] = fill;
    return;
  }
  const double a = g_out * (1.0 - w) / o.temperature, b = has_label ? g_out * w : 0.0;
  // Outside K: (q_j / q_R)(h_R - q_R S) a, with q_j / q_R = e_j exp(tile max - rest max) / rest sum; plus the
  // hard-label term b softmax(z)_j, which at temperature 1 is b q_j = b e_j exp(tile max - max - log_s).
  const double rest_coef = has_rest ? (r.h - std::exp(lq_rest) * sum_h) * a / rest.sum : 0.0;
  const double label_coef = raw_needed ? 0.0 : b;
  const float raw_log_sum = raw_needed ? raw.log_sum() : 0.f;
  for (int64_t j0 = 0; j0 < vocab; j0 += kTile) {
    const double tile_max = ws.tile_max[j0 / kTile];
    const float f = tile_max > -INFINITY ? static_cast<float>(std::exp(tile_max - rest.max) * rest_coef +
                                                              label_coef * std::exp(tile_max - max_x - log_s))
                                         : 0.f;
    Tile g = Eigen::Map<const Tile>(ws.e.data() + j0) * f;
    if (raw_needed) g += static_cast<float>(b) * probabilities(Eigen::Map<const Tile>(ws.z.data() + j0), raw.max,
                                                               raw_log_sum);
    if (label >= j0 && label < j0 + kTile) g[label - j0] -= static_cast<float>(b);
    const int64_t len = std::min(kTile, vocab - j0);
    for (int64_t c = 0; c < len; ++c) grad[j0 + c] = store<T>(g[c]);
  }
  // On K (written last: the pass above left its own values there): h_k - q_k S, and the hard-label term.
  for (int64_t i = 0; i < k; ++i) {
    const double q_raw = raw_needed ? std::exp((static_cast<double>(ws.z_k[i]) - raw.max) - raw_log_sum)
                                    : std::exp(ws.lq_k[i]);
    const double g = (ws.h_k[i] - std::exp(ws.lq_k[i]) * sum_h) * a + b * q_raw - (ids[i] == label ? b : 0.0);
    grad[ids[i]] = store<T>(static_cast<float>(g));
  }
}

}  // namespace

template <typename T>
void topk_forward(int64_t n_rows, Logits<T> student, TopKTeacher teacher, const int64_t* labels,
                  const float* grad_loss, const RowOptions& options, float* loss, float* stats, T* grad_student,
                  int64_t grad_student_stride) {
#pragma omp parallel
  {
    RowSpace ws;
    ws.reset(student.vocab, teacher.k);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t l = labels ? labels[i] : -1;
      const int64_t label = labels && l != options.ignore_index && l >= 0 && l < student.vocab ? l : -1;
      topk_row(student.data + i * student.row_stride, student.vocab, teacher.ids + i * teacher.k,
               teacher.logprobs + i * teacher.k, teacher, label, grad_loss ? grad_loss[i] : 0.f, options, loss + i,
               stats + i * kNumStats, grad_student ? grad_student + i * grad_student_stride : nullptr, ws);
    }
  }
}

#define DPKD_INSTANTIATE(T)                                                                                 \
  template void topk_forward<T>(int64_t, Logits<T>, TopKTeacher, const int64_t*, const float*,            \
                                const RowOptions&, float*, float*, T*, int64_t);
DPKD_INSTANTIATE(float)
DPKD_INSTANTIATE(BFloat16)
DPKD_INSTANTIATE(Float16)
#undef DPKD_INSTANTIATE

}  // namespace dpkd::distill
