#include "distill/objectives.h"

#include <Eigen/Core>

#include "distill/tile_math.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace dpkd::distill {
namespace {

using namespace tiles;

// Mean and population standard deviation over the finite entries of a row.
struct FiniteMoments {
  double shift = 0.0, sum = 0.0, sum_sq = 0.0;
  int64_t count = 0;
  void add(const Tile& z, int64_t len) {
    for (int64_t k = 0; k < len; ++k) {
      if (!std::isfinite(z[k])) continue;
      if (count == 0) shift = z[k];
      const double d = z[k] - shift;
      sum += d;
      sum_sq += d * d;
      ++count;
    }
  }
  double mean() const { return count ? shift + sum / count : 0.0; }
  double stddev() const {
    if (!count) return 0.0;
    const double m = sum / count;
    return std::sqrt(std::fmax(sum_sq / count - m * m, 0.0));
  }
};

// One row's raw inputs, tile by tile: student logits z_s and the teacher's (TAID-mixed) logits z_t,
// -inf beyond each model's vocabulary and beyond the tile's end.
template <class T>
struct Row {
  const T* s;
  const T* t;
  int64_t vs, vt, width;
  float mix;
  bool bad_s = false, bad_t = false;  // NaN or +inf seen

  int64_t read(int64_t j0, Tile& zs, Tile& zt) {
    const int64_t len = std::min(kTile, width - j0);
    if (j0 + kTile <= vs && j0 + kTile <= vt) {
      // Interior tile: a branch-free, vectorisable copy; NaN/+inf found through a NaN-propagating max.
      for (int64_t k = 0; k < kTile; ++k) zs[k] = load(s[j0 + k]);
      for (int64_t k = 0; k < kTile; ++k) zt[k] = load(t[j0 + k]);
      bad_s |= !(zs.maxCoeff<Eigen::PropagateNaN>() < INFINITY);
      bad_t |= !(zt.maxCoeff<Eigen::PropagateNaN>() < INFINITY);
    } else {
      for (int64_t k = 0; k < kTile; ++k) {
        const int64_t j = j0 + k;
        const float a = j < vs ? load(s[j]) : -INFINITY, b = j < vt ? load(t[j]) : -INFINITY;
        bad_s |= !(a < INFINITY);
        bad_t |= !(b < INFINITY);
        zs[k] = a;
        zt[k] = b;
      }
    }
    if (mix != 1.f) zt = mix == 0.f ? zs : Tile(mix * zt + (1.f - mix) * zs);
    return len;
  }
};

// The fused forward-with-gradient's per-thread scratch for one row: each entry's probabilities q and p and,
// for the two-pass objectives, g - g_ref, kept from the forward so that the backward right after it takes
// no exp or log (and the forward's second pass none for q and p). Pass 1 stores exp(x - running max) per
// tile with that max; normalize() turns them into probabilities once the log-sum-exps are known.
struct RowCache {
  std::vector<float> q, p, g, tile_max_s, tile_max_t;
  void reset(int64_t width, bool two_pass) {
    const size_t n = static_cast<size_t>((width + kTile - 1) / kTile * kTile);
    q.resize(n);
    p.resize(n);
    if (two_pass) g.resize(n);
    tile_max_s.assign(n / kTile, -INFINITY);
    tile_max_t.assign(n / kTile, -INFINITY);
  }
  static Eigen::Map<Tile> tile(std::vector<float>& v, int64_t j0) { return Eigen::Map<Tile>(v.data() + j0); }
  static Eigen::Map<const Tile> tile(const std::vector<float>& v, int64_t j0) {
    return Eigen::Map<const Tile>(v.data() + j0);
  }
  // exp(x - tile max) * exp(tile max - lse) = exp(x - lse): one scalar exp per tile. A tile (or a whole row)
  // without a finite logit holds zeros and keeps them (its factor would be exp(-inf + inf)).
  void normalize(float max_s, float log_sum_s, float max_t, float log_sum_t) {
    auto factor = [](float tile_max, float max, float log_sum) {
      return tile_max > -INFINITY && max > -INFINITY
                 ? static_cast<float>(std::exp(static_cast<double>(tile_max) - max - log_sum))
                 : 0.f;
    };
    for (size_t k = 0; k < tile_max_s.size(); ++k) {
      const int64_t j0 = static_cast<int64_t>(k) * kTile;
      tile(q, j0) *= factor(tile_max_s[k], max_s, log_sum_s);
      tile(p, j0) *= factor(tile_max_t[k], max_t, log_sum_t);
    }
  }
};

inline bool label_valid(const int64_t* labels, int64_t i, const RowOptions& o) {
  return labels != nullptr && labels[i] != o.ignore_index;
}

template <class T>
Row<T> make_row(Logits<T> s, Logits<T> t, int64_t i, const RowOptions& o) {
  return Row<T>{s.data + i * s.row_stride, t.data + i * t.row_stride, s.vocab, t.vocab,
                s.vocab > t.vocab ? s.vocab : t.vocab, o.teacher_mix};
}

template <class T>
void forward_row(Row<T>& row, const int64_t* labels, int64_t i, const RowOptions& o, float* loss, float* stats,
                 float* st, RowCache* cache = nullptr) {
  Tile zs, zt;
  const float inv_t = 1.f / o.temperature;
  float mean_s = 0.f, scale_s = inv_t, mean_t = 0.f, scale_t = inv_t, std_s = 0.f;
  int64_t count_s = row.vs;
  if (o.standardize) {
    FiniteMoments ms, mt;
    for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
      const int64_t len = row.read(j0, zs, zt);
      ms.add(zs, len);
      mt.add(zt, len);
    }
    mean_s = static_cast<float>(ms.mean());
    std_s = static_cast<float>(ms.stddev());
    count_s = ms.count;
    scale_s = inv_t / (std_s + o.standardize_eps);
    mean_t = static_cast<float>(mt.mean());
    scale_t = inv_t / (static_cast<float>(mt.stddev()) + o.standardize_eps);
  }
  const bool has_label = label_valid(labels, i, o);
  const int64_t label = has_label ? labels[i] : -1;
  const bool raw_needed = has_label && o.hard_label_weight > 0.f && (o.standardize || o.temperature != 1.f);

  // Pass 1: log-sum-exp of both models (and of the raw student logits for the hard-label term). For the
  // KLs it also gathers everything else: sum q x, sum p y and sum p (y - x) or sum q (x - y).
  const Divergence d = effective_divergence(o.objective);
  const bool single_pass = d == Divergence::kForwardKL || d == Divergence::kReverseKL;
  OnlineSoftmax lse_s, lse_t, lse_raw;
  int64_t argmax_s = -1;  // the student's most likely entry (two-pass objectives: where g_ref is taken)
  float x_label = -INFINITY, y_label = -INFINITY, z_label = -INFINITY;
  auto take_label = [&](int64_t j0, const Tile& x, const Tile& y) {
    if (label >= j0 && label < j0 + kTile) {
      z_label = zs[label - j0];
      x_label = x[label - j0];
      y_label = y[label - j0];
    }
  };
  if (cache) cache->reset(row.width, !single_pass);
  for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
    row.read(j0, zs, zt);
    if (raw_needed) lse_raw.add(zs);
    const Tile x = (zs - mean_s) * scale_s, y = (zt - mean_t) * scale_t;
    float* e_s = cache ? cache->q.data() + j0 : nullptr;
    float* e_t = cache ? cache->p.data() + j0 : nullptr;
    if (single_pass) {
      take_label(j0, x, y);
      const Tile y_minus_x = y - x, x_minus_y = x - y;
      lse_s.add(x, true, d == Divergence::kReverseKL ? &x_minus_y : nullptr, e_s);
      lse_t.add(y, true, d == Divergence::kForwardKL ? &y_minus_x : nullptr, e_t);
    } else {
      Eigen::Index k;
      if (x.maxCoeff(&k) > lse_s.max) argmax_s = j0 + k;
      lse_s.add(x, false, nullptr, e_s);
      lse_t.add(y, false, nullptr, e_t);
    }
    if (cache) {
      cache->tile_max_s[j0 / kTile] = lse_s.max;
      cache->tile_max_t[j0 / kTile] = lse_t.max;
    }
  }
  if (!raw_needed) lse_raw = lse_s;  // same logits: temperature 1, no standardization
  const float ls_s = lse_s.log_sum(), ls_t = lse_t.log_sum();
  if (cache) cache->normalize(lse_s.max, ls_s, lse_t.max, ls_t);
  const double full_lse_s = static_cast<double>(lse_s.max) + ls_s, full_lse_t = static_cast<double>(lse_t.max) + ls_t;
  const float c = static_cast<float>(full_lse_s - full_lse_t);

  // Pass 2 (all but the KLs): the divergence, <q, g - g_ref>, and the entropies, log sum - sum q (x - max).
  double div = 0.0, qg = 0.0, entropy_s = ls_s, entropy_t = ls_t;
  float g_ref = 0.f;
  if (single_pass) {
    entropy_s = lse_s.entropy();
    entropy_t = lse_t.entropy();
    // KL(p||q) = sum p (y - x) + lse_s - lse_t; KL(q||p) = sum q (x - y) - (lse_s - lse_t) = <q, g>.
    div = d == Divergence::kForwardKL ? lse_t.mean() + (full_lse_s - full_lse_t)
                                      : lse_s.mean() - (full_lse_s - full_lse_t);
    qg = d == Divergence::kReverseKL ? lse_s.mean() : 0.0;  // <q, x - y>: g without its constant
  } else {
    auto terms = [&](int64_t j0) {  // reads the tile at j0 into zs, zt
      row.read(j0, zs, zt);
      const Tile x = (zs - mean_s) * scale_s, y = (zt - mean_t) * scale_t;
      const Tile q = cache ? Tile(RowCache::tile(cache->q, j0)) : probabilities(x, lse_s.max, ls_s);
      const Tile p = cache ? Tile(RowCache::tile(cache->p, j0)) : probabilities(y, lse_t.max, ls_t);
      return std::tuple{x, y, q, p, element_terms<TileMath>(d, o.objective, q, p, Tile(y - x), c)};
    };
    if (argmax_s >= 0) {
      const int64_t j0 = argmax_s / kTile * kTile;
      g_ref = std::get<4>(terms(j0)).g[argmax_s - j0];
    }
    for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
      const auto [x, y, q, p, e] = terms(j0);
      if (cache) RowCache::tile(cache->g, j0) = e.g - g_ref;
      take_label(j0, x, y);
      div += e.loss.sum();
      qg += masked(q, Tile(e.g - g_ref)).sum();
      entropy_s -= masked(q, Tile(x - lse_s.max)).sum();
      entropy_t -= masked(p, Tile(y - lse_t.max)).sum();
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // NaN (reported by the Python layer) for NaN or +inf logits, and for a row without a finite logit: no
  // distribution. Its divergence and loss are NaN too (the objectives' sums would give some of them a finite
  // value), so that where the report is skipped (torch.compile) the loss still shows it.
  const bool no_distribution = !(lse_s.max > -INFINITY) || !(lse_t.max > -INFINITY);
  stats[kStudentEntropy] = row.bad_s || !(lse_s.max > -INFINITY) ? nan : static_cast<float>(entropy_s);
  stats[kTeacherEntropy] = row.bad_t || !(lse_t.max > -INFINITY) ? nan : static_cast<float>(entropy_t);
  stats[kDivergence] = no_distribution ? nan : static_cast<float>(div);
  stats[kStudentLabelLogprob] = has_label ? static_cast<float>(x_label - full_lse_s) : nan;
  stats[kTeacherLabelLogprob] = has_label ? static_cast<float>(y_label - full_lse_t) : nan;
  const float raw_log_sum = lse_raw.log_sum();
  if (labels != nullptr && !has_label) {
    *loss = 0.f;
  } else if (no_distribution) {
    *loss = nan;
  } else if (has_label && o.hard_label_weight > 0.f) {
    const float ce = static_cast<float>((static_cast<double>(lse_raw.max) + raw_log_sum) - z_label);
    *loss = (1.f - o.hard_label_weight) * static_cast<float>(div) + o.hard_label_weight * ce;
  } else {
    *loss = static_cast<float>(div);
  }
  for (int k = 0; k < kRowState; ++k) st[k] = 0.f;
  st[kMaxS] = lse_s.max;
  st[kLogSumS] = ls_s;
  st[kMaxT] = lse_t.max;
  st[kLogSumT] = ls_t;
  st[kQG] = static_cast<float>(qg);
  st[kMeanS] = mean_s;
  st[kScaleS] = scale_s;
  st[kMeanT] = mean_t;
  st[kScaleT] = scale_t;
  st[kStdS] = std_s;
  st[kCountS] = static_cast<float>(count_s);
  st[kRawMax] = lse_raw.max;
  st[kRawLogSum] = raw_log_sum;
  st[kGRef] = g_ref;
}

// With `cache` (filled by forward_row on this row just before), q, p and g - g_ref come from it.
template <class T>
void backward_row(Row<T>& row, float grad, const int64_t* labels, int64_t i, const RowOptions& o, const float* st,
                  T* out, const RowCache* cache = nullptr) {
  const bool has_label = label_valid(labels, i, o);
  if (grad == 0.f || (labels != nullptr && !has_label)) {
    for (int64_t j = 0; j < row.vs; ++j) out[j] = store<T>(0.f);
    return;
  }
  const float w = has_label ? o.hard_label_weight : 0.f;
  const float a = (1.f - w) * grad, b = w * grad;
  const int64_t label = has_label ? labels[i] : -1;
  const Divergence d = effective_divergence(o.objective);
  const float c = static_cast<float>((static_cast<double>(st[kMaxS]) + st[kLogSumS]) -
                                     (static_cast<double>(st[kMaxT]) + st[kLogSumT]));
  Tile zs, zt;

  // d D / d x for one tile of raw student logits zs (kept raw for the chain rule).
  auto grad_x = [&](int64_t j0) {
    row.read(j0, zs, zt);
    const Tile x = (zs - st[kMeanS]) * st[kScaleS], y = (zt - st[kMeanT]) * st[kScaleT];
    const Tile q = cache ? Tile(RowCache::tile(cache->q, j0)) : probabilities(x, st[kMaxS], st[kLogSumS]);
    const Tile p = cache ? Tile(RowCache::tile(cache->p, j0)) : probabilities(y, st[kMaxT], st[kLogSumT]);
    if (d == Divergence::kForwardKL) return Tile(q - p);
    if (cache && d != Divergence::kReverseKL)
      return element_grad<TileMath>(d, q, p, Tile(RowCache::tile(cache->g, j0)), st[kQG]);
    const ElementTerms<Tile> e = element_terms<TileMath>(d, o.objective, q, p, Tile(y - x), c);
    return element_grad<TileMath>(d, q, p, Tile(e.g - st[kGRef]), st[kQG]);
  };

  // Standardization's Jacobian needs two row sums of the x-gradient first.
  const float mean_s = st[kMeanS], std_s = st[kStdS], n_s = st[kCountS];
  float g1_mean = 0.f, g2_term = 0.f;
  if (o.standardize) {
    double g1 = 0.0, g2 = 0.0;
    for (int64_t j0 = 0; j0 < row.vs; j0 += kTile) {
      const Tile gx = grad_x(j0);
      const Tile live = blend(zs > -INFINITY, gx, Tile::Zero());
      g1 += live.sum();
      g2 += blend(zs > -INFINITY, Tile(live * (zs - mean_s)), Tile::Zero()).sum();
    }
    g1_mean = static_cast<float>(g1 / n_s);
    if (std_s > 0.f) g2_term = static_cast<float>(g2 / (n_s * std_s * (std_s + o.standardize_eps)));
  }
  for (int64_t j0 = 0; j0 < row.vs; j0 += kTile) {
    const Tile gx = grad_x(j0);
    Tile gz = o.standardize ? Tile(st[kScaleS] * (gx - g1_mean - (zs - mean_s) * g2_term)) : Tile(st[kScaleS] * gx);
    gz *= a;
    if (b != 0.f) {
      gz += b * probabilities(zs, st[kRawMax], st[kRawLogSum]);
      if (label >= j0 && label < j0 + kTile) gz[label - j0] -= b;
    }
    for (int64_t k = 0; k < kTile; ++k) gz[k] = zs[k] > -INFINITY ? gz[k] : 0.f;
    const int64_t len = std::min(kTile, row.vs - j0);
    for (int64_t k = 0; k < len; ++k) out[j0 + k] = store<T>(gz[k]);
  }
}

}  // namespace

template <typename T>
void forward(int64_t n_rows, Logits<T> student, Logits<T> teacher, const int64_t* labels, const RowOptions& options,
             float* loss, float* stats, float* row_state) {
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n_rows; ++i) {
    Row<T> row = make_row(student, teacher, i, options);
    forward_row(row, labels, i, options, loss + i, stats + i * kNumStats, row_state + i * kRowState);
  }
}

template <typename T>
void backward(int64_t n_rows, const float* grad_loss, Logits<T> student, Logits<T> teacher, const int64_t* labels,
              const float* row_state, const RowOptions& options, T* grad_student, int64_t grad_student_stride) {
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n_rows; ++i) {
    Row<T> row = make_row(student, teacher, i, options);
    backward_row(row, grad_loss[i], labels, i, options, row_state + i * kRowState,
                 grad_student + i * grad_student_stride);
  }
}

template <typename T>
void forward_backward(int64_t n_rows, Logits<T> student, Logits<T> teacher, const int64_t* labels,
                      const float* grad_loss, const RowOptions& options, float* loss, float* stats, float* row_state,
                      T* grad_student, int64_t grad_student_stride) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel
  {
    RowCache cache;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n_rows; ++i) {
      Row<T> row = make_row(student, teacher, i, options);
      float* st = row_state + i * kRowState;
      if (grad_loss[i] == 0.f) {  // a row without weight: nothing to compute
        loss[i] = 0.f;
        for (int k = 0; k < kNumStats; ++k) stats[i * kNumStats + k] = nan;
        for (int k = 0; k < kRowState; ++k) st[k] = 0.f;
      } else {
        forward_row(row, labels, i, options, loss + i, stats + i * kNumStats, st, &cache);
      }
      // Right after the forward pass, while the row is still in cache (this writes zeros for a skipped row).
      backward_row(row, grad_loss[i], labels, i, options, st, grad_student + i * grad_student_stride,
                   grad_loss[i] == 0.f ? nullptr : &cache);
    }
  }
}

#define DPKD_INSTANTIATE(T)                                                                                      \
  template void forward<T>(int64_t, Logits<T>, Logits<T>, const int64_t*, const RowOptions&, float*, float*,   \
                           float*);                                                                            \
  template void forward_backward<T>(int64_t, Logits<T>, Logits<T>, const int64_t*, const float*,               \
                                    const RowOptions&, float*, float*, float*, T*, int64_t);                   \
  template void backward<T>(int64_t, const float*, Logits<T>, Logits<T>, const int64_t*, const float*,         \
                            const RowOptions&, T*, int64_t);
DPKD_INSTANTIATE(float)
DPKD_INSTANTIATE(BFloat16)
DPKD_INSTANTIATE(Float16)
#undef DPKD_INSTANTIATE

}  // namespace dpkd::distill
