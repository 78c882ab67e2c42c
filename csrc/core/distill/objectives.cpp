#include "distill/objectives.h"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace dpkd::distill {
namespace {

// Rows are streamed in tiles that stay in L1; Eigen vectorises the exponentials over a tile.
constexpr int64_t kTile = 512;
using ArrayMap = Eigen::Map<Eigen::ArrayXf>;

inline float load(float v) { return v; }
inline float load(BFloat16 v) { return bf16_to_float(v.bits); }
inline float load(Float16 v) { return half_to_float(v.bits); }
template <class T> T store(float f);
template <> float store<float>(float f) { return f; }
template <> BFloat16 store<BFloat16>(float f) { return {float_to_bf16(f)}; }
template <> Float16 store<Float16>(float f) { return {float_to_half(f)}; }

enum State : int {
  kMaxS = 0, kLogSumS, kMaxT, kLogSumT, kQG, kMeanS, kScaleS, kMeanT, kScaleT, kStdS, kCountS, kRawMax, kRawLogSum,
};

// out = exp((x - max) - log_sum), exactly 0 where x = -inf. The two shifts stay apart: max + log_sum
// rounded to float would cost ulp(max) of relative accuracy (1e-3 at logits of 1e4). Eigen's vectorised exp clamps its argument at about
// -88, so exp(-inf) would come out as ~1e-38 and a padded column would get a probability.
inline void exp_shifted(const float* x, float max, float log_sum, float* out, int64_t len) {
  const ArrayMap a(const_cast<float*>(x), len);
  ArrayMap(out, len) = (a > -INFINITY).select(((a - max) - log_sum).exp(), 0.f);
}

// Online log-sum-exp over tiles: the running max is a data value, the sum is kept in double.
struct OnlineLse {
  float max = -INFINITY;
  double sum = 0.0;
  void add(const float* x, int64_t len) {
    const ArrayMap a(const_cast<float*>(x), len);
    const float m = a.maxCoeff();
    if (!(m > -INFINITY)) return;
    if (m > max) {
      sum *= std::exp(static_cast<double>(max) - m);
      max = m;
    }
    sum += static_cast<double>((a > -INFINITY).select((a - max).exp(), 0.f).sum());
  }
  float log_sum() const { return static_cast<float>(std::log(sum)); }
};

// Mean and population standard deviation over the finite entries of a row.
struct FiniteMoments {
  double shift = 0.0, sum = 0.0, sum_sq = 0.0;
  int64_t count = 0;
  void add(const float* z, int64_t len) {
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
// -inf beyond each model's vocabulary.
template <class T>
struct Row {
  const T* s;
  const T* t;
  int64_t vs, vt, width;
  float mix;
  bool bad_s = false, bad_t = false;  // NaN or +inf seen

  void read(int64_t j0, int64_t len, float* zs, float* zt) {
    for (int64_t k = 0; k < len; ++k) {
      const int64_t j = j0 + k;
      const float a = j < vs ? load(s[j]) : -INFINITY;
      float b = j < vt ? load(t[j]) : -INFINITY;
      bad_s |= !(a < INFINITY);
      bad_t |= !(b < INFINITY);
      if (mix != 1.f) b = mix == 0.f ? a : mix * b + (1.f - mix) * a;
      zs[k] = a;
      zt[k] = b;
    }
  }
};

inline void transform(float* z, int64_t len, float mean, float scale) {
  ArrayMap a(z, len);
  a = (a - mean) * scale;
}

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
                 float* st) {
  float zs[kTile], zt[kTile];
  const float inv_t = 1.f / o.temperature;
  float mean_s = 0.f, scale_s = inv_t, mean_t = 0.f, scale_t = inv_t, std_s = 0.f;
  int64_t count_s = row.vs;
  if (o.standardize) {
    FiniteMoments ms, mt;
    for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
      const int64_t len = std::min(kTile, row.width - j0);
      row.read(j0, len, zs, zt);
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

  // Pass 1: log-sum-exp of both models (and of the raw student logits for the hard-label term).
  OnlineLse lse_s, lse_t, lse_raw;
  for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
    const int64_t len = std::min(kTile, row.width - j0);
    row.read(j0, len, zs, zt);
    if (raw_needed) lse_raw.add(zs, len);
    transform(zs, len, mean_s, scale_s);
    transform(zt, len, mean_t, scale_t);
    lse_s.add(zs, len);
    lse_t.add(zt, len);
  }
  if (!raw_needed) lse_raw = lse_s;  // same logits: temperature 1, no standardization
  const float ls_s = lse_s.log_sum(), ls_t = lse_t.log_sum();
  const float c = static_cast<float>((static_cast<double>(lse_s.max) + ls_s) - (static_cast<double>(lse_t.max) + ls_t));

  // Pass 2: the divergence, <q, g>, and the entropies' sums.
  const Divergence d = effective_divergence(o.objective);
  double div = 0.0, qg = 0.0, qx = 0.0, py = 0.0;
  float x_label = -INFINITY, y_label = -INFINITY, z_label = -INFINITY;
  float q[kTile], p[kTile];
  for (int64_t j0 = 0; j0 < row.width; j0 += kTile) {
    const int64_t len = std::min(kTile, row.width - j0);
    row.read(j0, len, zs, zt);
    if (label >= j0 && label < j0 + len) z_label = zs[label - j0];
    transform(zs, len, mean_s, scale_s);
    transform(zt, len, mean_t, scale_t);
    if (label >= j0 && label < j0 + len) {
      x_label = zs[label - j0];
      y_label = zt[label - j0];
    }
    exp_shifted(zs, lse_s.max, ls_s, q, len);
    exp_shifted(zt, lse_t.max, ls_t, p, len);
    float tile_div = 0.f, tile_qg = 0.f, tile_qx = 0.f, tile_py = 0.f;
    for (int64_t k = 0; k < len; ++k) {
      if (q[k] == 0.f && p[k] == 0.f) continue;
      const ElementTerms e = element_terms(d, o.objective, q[k], p[k], (zt[k] - zs[k]) + c);
      tile_div += e.loss;
      if (q[k] > 0.f) {
        tile_qg += q[k] * e.g;
        tile_qx += q[k] * zs[k];
      }
      if (p[k] > 0.f) tile_py += p[k] * zt[k];
    }
    div += tile_div;
    qg += tile_qg;
    qx += tile_qx;
    py += tile_py;
  }
  const double full_lse_s = static_cast<double>(lse_s.max) + ls_s, full_lse_t = static_cast<double>(lse_t.max) + ls_t;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  stats[kStudentEntropy] = row.bad_s ? nan : static_cast<float>(full_lse_s - qx);
  stats[kTeacherEntropy] = row.bad_t ? nan : static_cast<float>(full_lse_t - py);
  stats[kDivergence] = static_cast<float>(div);
  stats[kStudentLabelLogprob] = has_label ? static_cast<float>(x_label - full_lse_s) : nan;
  stats[kTeacherLabelLogprob] = has_label ? static_cast<float>(y_label - full_lse_t) : nan;
  const float raw_log_sum = lse_raw.log_sum();
  if (labels != nullptr && !has_label) {
    *loss = 0.f;
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
}

template <class T>
void backward_row(Row<T>& row, float grad, const int64_t* labels, int64_t i, const RowOptions& o, const float* st,
                  T* out) {
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
  float zs[kTile], zt[kTile], xs[kTile], q[kTile], p[kTile], gx[kTile];

  // d D / d x for one tile (x, y transformed in place; zs kept raw for the chain rule).
  auto grad_x = [&](int64_t j0, int64_t len) {
    row.read(j0, len, zs, zt);
    for (int64_t k = 0; k < len; ++k) xs[k] = zs[k];
    transform(xs, len, st[kMeanS], st[kScaleS]);
    transform(zt, len, st[kMeanT], st[kScaleT]);
    exp_shifted(xs, st[kMaxS], st[kLogSumS], q, len);
    exp_shifted(zt, st[kMaxT], st[kLogSumT], p, len);
    for (int64_t k = 0; k < len; ++k) {
      if (q[k] == 0.f && p[k] == 0.f) { gx[k] = 0.f; continue; }
      const ElementTerms e = element_terms(d, o.objective, q[k], p[k], (zt[k] - xs[k]) + c);
      gx[k] = element_grad(d, q[k], p[k], e.g, st[kQG]);
    }
  };

  // Standardization's Jacobian needs two row sums of the x-gradient first.
  double g1 = 0.0, g2 = 0.0;
  const float mean_s = st[kMeanS], std_s = st[kStdS], n_s = st[kCountS];
  if (o.standardize) {
    for (int64_t j0 = 0; j0 < row.vs; j0 += kTile) {
      const int64_t len = std::min(kTile, row.vs - j0);
      grad_x(j0, len);
      for (int64_t k = 0; k < len; ++k) {
        if (!std::isfinite(zs[k])) continue;
        g1 += gx[k];
        g2 += static_cast<double>(gx[k]) * (zs[k] - mean_s);
      }
    }
  }
  const float g1_mean = static_cast<float>(g1 / n_s);
  const float g2_term = std_s > 0.f ? static_cast<float>(g2 / (n_s * std_s * (std_s + o.standardize_eps))) : 0.f;
  for (int64_t j0 = 0; j0 < row.vs; j0 += kTile) {
    const int64_t len = std::min(kTile, row.vs - j0);
    grad_x(j0, len);
    for (int64_t k = 0; k < len; ++k) {
      float gz = 0.f;
      if (zs[k] > -INFINITY) {
        gz = o.standardize ? st[kScaleS] * (gx[k] - g1_mean - (zs[k] - mean_s) * g2_term) : st[kScaleS] * gx[k];
        gz *= a;
        if (b != 0.f) {
          const float soft = std::exp((zs[k] - st[kRawMax]) - st[kRawLogSum]);
          gz += b * (soft - (j0 + k == label ? 1.f : 0.f));
        }
      }
      out[j0 + k] = store<T>(gz);
    }
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

#define DPKD_INSTANTIATE(T)                                                                                      \
  template void forward<T>(int64_t, Logits<T>, Logits<T>, const int64_t*, const RowOptions&, float*, float*,   \
                           float*);                                                                            \
  template void backward<T>(int64_t, const float*, Logits<T>, Logits<T>, const int64_t*, const float*,         \
                            const RowOptions&, T*, int64_t);
DPKD_INSTANTIATE(float)
DPKD_INSTANTIATE(BFloat16)
DPKD_INSTANTIATE(Float16)
#undef DPKD_INSTANTIATE

}  // namespace dpkd::distill
