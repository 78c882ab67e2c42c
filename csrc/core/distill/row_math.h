// Per-element math of every distillation objective, shared by the CPU kernels (csrc/core/distill)
// and the CUDA kernels (kernels/). Plain functions of scalars: nvcc and g++ compile the same text.
//
// Everything is written in terms of, per vocabulary entry j,
//   q_j = exp(x_j - lse_s), p_j = exp(y_j - lse_t)   (student and teacher probabilities)
//   r_j = log p_j - log q_j = (y_j - x_j) + (lse_s - lse_t)
// where x, y are the logits after standardization and temperature. r is formed from the difference
// of the logits plus a per-row constant, so no term subtracts two large log-sum-exps per element.
// Every gradient with respect to x has the form q ⊙ (g - <q, g>) (forward KL: q - p directly), so
// the forward pass saves <q, g> per row and the backward pass is one read of the logits.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "host_device.h"

namespace dpkd::distill {

enum class Divergence : int32_t {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
};

// The objective and its mixing weights. The logs and complements are formed once, in double, by
// make_objective: beta = 1 - 1e-6 rounded to float would make 1 - beta wrong by 1%.
struct ObjectiveParams {
  Divergence divergence = Divergence::kForwardKL;
  float beta = 0.5f, one_minus_beta = 0.5f, log_beta = -0.6931472f, log_one_minus_beta = -0.6931472f;
  float log_beta_odds = 0.f;  // log(beta / (1 - beta))
  float alpha = 0.1f, one_minus_alpha = 0.9f, log_alpha = -2.3025851f, log_one_minus_alpha = -0.1053605f;
};

// beta (JSD): m = beta p + (1 - beta) q; beta = 0 is forward KL and beta = 1 reverse KL (TRL's
// generalized_jsd_loss). alpha: skew KL m = alpha p + (1 - alpha) q; skew reverse KL m = (1 - alpha) p + alpha q.
inline ObjectiveParams make_objective(Divergence d, double beta, double alpha) {
  ObjectiveParams o;
  o.divergence = d;
  o.beta = static_cast<float>(beta);
  o.one_minus_beta = static_cast<float>(1.0 - beta);
  o.log_beta = static_cast<float>(log(beta));
  o.log_one_minus_beta = static_cast<float>(log1p(-beta));
  o.log_beta_odds = static_cast<float>(log(beta) - log1p(-beta));
  o.alpha = static_cast<float>(alpha);
  o.one_minus_alpha = static_cast<float>(1.0 - alpha);
  o.log_alpha = static_cast<float>(log(alpha));
  o.log_one_minus_alpha = static_cast<float>(log1p(-alpha));
  return o;
}

// Options, statistics columns and saved row state: the same layout on both devices.
struct RowOptions {
  ObjectiveParams objective;
  float temperature = 1.f;         // divides both models' logits (after standardization)
  bool standardize = false;        // z-score each row (over its finite entries) before the temperature
  float standardize_eps = 1e-6f;   // z = (z - mean) / (std + eps)
  float hard_label_weight = 0.f;   // w: loss = (1 - w) D + w CE(raw student logits, label)
  int64_t ignore_index = -100;     // rows with this label carry no loss and no gradient
  float teacher_mix = 1.f;         // TAID: the teacher's logits become mix z_t + (1 - mix) z_s
  // CUDA: fp32 logits get the hardware exp2/log2 that 16-bit logits always get, for fp32 logits that carry no
  // more than 16-bit factors' precision (a bf16 matmul's fp32 output). The CPU's vectorised math is accurate.
  bool fast_math = false;
};

// Per-token statistics, columns of the [N, kNumStats] output.
enum Stat : int { kStudentEntropy = 0, kTeacherEntropy, kDivergence, kStudentLabelLogprob, kTeacherLabelLogprob, kNumStats };

// Per-row scalars saved by the forward pass for the backward pass: the two log-sum-exps as (max,
// log sum) pairs, <q, g - g_ref>, the standardization transforms x = (z - mean) * scale, the raw student
// log-sum-exp for the hard-label term, and g_ref. g_ref is g at the student's most likely entry (0 where
// a kernel does not shift): with it, g - g_ref - <q, g - g_ref> does not cancel where g - <q, g> is
// small next to g, which costs fp32 gradients up to 1e-3 of relative error for peaked rows otherwise.
inline constexpr int kRowState = 16;
enum RowStateSlot : int {
  kMaxS = 0, kLogSumS, kMaxT, kLogSumT, kQG, kMeanS, kScaleS, kMeanT, kScaleT, kStdS, kCountS, kRawMax, kRawLogSum,
  kGRef,
};

// The math below is written once over a value type V and a policy M that supplies exp, log1p, max,
// min, sign and select: ScalarMath (float; CUDA threads) here, and a tile-of-floats policy on Eigen
// arrays in the CPU kernels, which vectorises the same formulas.
struct ScalarMath {
  static DPKD_HOST_DEVICE float exp(float x) { return expf(x); }
  static DPKD_HOST_DEVICE float log1p(float x) { return log1pf(x); }
  static DPKD_HOST_DEVICE float max(float a, float b) { return fmaxf(a, b); }
  static DPKD_HOST_DEVICE float min(float a, float b) { return fminf(a, b); }
  static DPKD_HOST_DEVICE float abs(float x) { return fabsf(x); }
  static DPKD_HOST_DEVICE float sign(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }
  static DPKD_HOST_DEVICE float select(bool c, float a, float b) { return c ? a : b; }
};

// log(exp(a) + exp(b)), -inf when both are -inf.
template <class M, class V>
DPKD_HOST_DEVICE V log_add_exp(const V& a, const V& b) {
  const V hi = M::max(a, b), lo = M::min(a, b);
  return M::select(hi == -INFINITY, V(hi), V(hi + M::log1p(M::exp(lo - hi))));
}

// The JSD endpoints and skew KLs at alpha = 0 are the KLs themselves (the mixture formulas degenerate
// there: the skew reverse KL's g below leaves out a -log alpha). The JSD's endpoints are told apart by the logs
// make_objective forms in double: beta = 1 - 1e-12 rounds to 1.f, but its log1p(-beta) is -27.6, not -inf (a JSD
// of ~1e-12, not the reverse KL). An alpha below float's normal range is the KL: the mixture formulas with
// alpha = 0.f (or subnormal) and log alpha ~ -115 overflow or cancel.
DPKD_HOST_DEVICE Divergence effective_divergence(const ObjectiveParams& o) {
  if (o.divergence == Divergence::kJSD) {
    if (o.log_beta == -INFINITY) return Divergence::kForwardKL;
    if (o.log_one_minus_beta == -INFINITY) return Divergence::kReverseKL;
  }
  const bool alpha_zero = o.alpha < 1.17549435e-38f;  // FLT_MIN
  if (alpha_zero && o.divergence == Divergence::kSkewKL) return Divergence::kForwardKL;
  if (alpha_zero && o.divergence == Divergence::kSkewReverseKL) return Divergence::kReverseKL;
  return o.divergence;
}

template <class V>
struct ElementTerms {
  V loss;  // each entry's contribution to the divergence
  V g;     // gradient factor: d loss / d x_j = q_j (g_j - <q, g>)
};

// Vocabulary entries with probabilities q, p, the logit difference y - x and the row constant
// c = lse_s - lse_t, so that r = log p - log q = (y - x) + c (+-inf where one probability is 0, NaN
// where both are: every term is then masked to 0 by a select on p > 0 or q > 0). `d` must come from
// effective_divergence. g may be shifted by any row constant (the gradient q (g - <q, g>) does not
// see it); reverse KL uses that to leave c out of g, so that <q, g> from a single online pass and g
// in the backward pass round alike.
template <class M, class V>
DPKD_HOST_DEVICE ElementTerms<V> element_terms(Divergence d, const ObjectiveParams& o, const V& q, const V& p,
                                               const V& y_minus_x, float c) {
  const V zero = V(q * 0.f);
  const V r = V(y_minus_x + c);
  switch (d) {
    case Divergence::kForwardKL:  // p (log p - log q); the gradient q - p is formed directly
      return {M::select(p > 0.f, V(p * r), zero), zero};
    case Divergence::kReverseKL:  // q (log q - log p); g = log q - log p = x - y (+ const)
      return {M::select(q > 0.f, V(-q * r), zero), V(-y_minus_x)};
    case Divergence::kJSD: {
      // beta KL(p||m) + (1 - beta) KL(q||m) with log(m/q) = log((1 - beta) + beta e^r) and log(m/p) =
      // log(beta + (1 - beta) e^-r): two log-add-exps whose arguments differ by +-(r + log(beta / (1 - beta))),
      // so each is its larger argument plus the same log1p(e^-|r + log_beta_odds|). Both are formed
      // directly (never as a difference of two O(r) numbers, which would lose them as beta -> 0 or 1)
      // for one exp and one log1p per entry.
      const V shared = M::log1p(M::exp(V(-M::abs(V(r + o.log_beta_odds)))));
      const V log_m_over_q = V(M::max(V(zero + o.log_one_minus_beta), V(r + o.log_beta)) + shared);
      const V log_m_over_p = V(M::max(V(zero + o.log_beta), V(o.log_one_minus_beta - r)) + shared);
      return {V(M::select(p > 0.f, V(-o.beta * p * log_m_over_p), zero) -
                M::select(q > 0.f, V(o.one_minus_beta * q * log_m_over_q), zero)),
              V(-o.one_minus_beta * log_m_over_q)};
    }
    case Divergence::kSkewKL: {
      // m / p = alpha + (1 - alpha) e^-r; loss p log(p / m); g = -(1 - alpha) p / m.
      const V log_m_over_p = log_add_exp<M>(V(zero + o.log_alpha), V(o.log_one_minus_alpha - r));
      return {M::select(p > 0.f, V(-p * log_m_over_p), zero), V(-o.one_minus_alpha * M::exp(V(-log_m_over_p)))};
    }
    case Divergence::kSkewReverseKL: {
      // With z = r + log((1 - alpha) / alpha): m / q = alpha (1 + e^z), loss q log(q / m) and
      // g = log(q / m) + 1 - alpha q / m = sigmoid(z) - softplus(z) - log alpha. The row constant -log alpha
      // is left out of g: where the teacher's probability is small, g - g_ref is a difference of O(e^z)
      // numbers instead of O(log alpha) ones, which cost fp32 gradients 4e-5 of relative error.
      const V z = V(r + (o.log_one_minus_alpha - o.log_alpha));
      const V e = M::exp(V(-M::abs(z)));
      const V softplus = V(M::max(z, zero) + M::log1p(e));
      const V sigmoid = V(M::select(z >= 0.f, V(zero + 1.f), e) / (1.f + e));
      return {M::select(q > 0.f, V(-q * (softplus + o.log_alpha)), zero), V(sigmoid - softplus)};
    }
    case Divergence::kTVD:  // 1/2 |p - q|; g = 1/2 sign(q - p) = -1/2 sign(r)
      return {V(0.5f * M::abs(V(p - q))), V(-0.5f * M::sign(r))};
  }
  return {zero, zero};
}

// d loss / d x_j from the entry's g and the row's <q, g>.
template <class M, class V>
DPKD_HOST_DEVICE V element_grad(Divergence d, const V& q, const V& p, const V& g, float qg) {
  if (d == Divergence::kForwardKL) return V(q - p);
  return M::select(q > 0.f, V(q * (g - qg)), V(q * 0.f));
}

// bf16 and fp16 storage as uint16_t, converted without library support so both compilers agree.
DPKD_HOST_DEVICE float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

DPKD_HOST_DEVICE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

DPKD_HOST_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mant;
      do { m <<= 1; ++e; } while ((m & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

DPKD_HOST_DEVICE uint16_t float_to_half(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = abs >> 23, m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (112 - e)
    uint32_t v = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (v & 1u))) ++v;
    return static_cast<uint16_t>(sign | v);
  }
  uint32_t v = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
  return static_cast<uint16_t>(sign | v);
}

}  // namespace dpkd::distill
