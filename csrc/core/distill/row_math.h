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

#ifdef __CUDACC__
#define DPKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPKD_HOST_DEVICE inline
#endif

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
  o.alpha = static_cast<float>(alpha);
  o.one_minus_alpha = static_cast<float>(1.0 - alpha);
  o.log_alpha = static_cast<float>(log(alpha));
  o.log_one_minus_alpha = static_cast<float>(log1p(-alpha));
  return o;
}

// log(exp(a) + exp(b)), safe for -inf.
DPKD_HOST_DEVICE float log_add_exp(float a, float b) {
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  if (hi == -INFINITY) return -INFINITY;
  return hi + log1pf(expf(lo - hi));
}

// The JSD endpoints are the KLs themselves (the mixture formula degenerates to 0 there).
DPKD_HOST_DEVICE Divergence effective_divergence(const ObjectiveParams& o) {
  if (o.divergence == Divergence::kJSD) {
    if (o.beta == 0.f) return Divergence::kForwardKL;
    if (o.beta == 1.f) return Divergence::kReverseKL;
  }
  return o.divergence;
}

struct ElementTerms {
  float loss;  // this entry's contribution to the divergence
  float g;     // gradient factor: d loss / d x_j = q_j (g_j - <q, g>)
};

// One vocabulary entry. q, p are probabilities, r = log p - log q (may be +-inf where one is 0).
// `d` must come from effective_divergence. Entries with p = q = 0 contribute nothing (callers skip
// them: r is NaN there).
DPKD_HOST_DEVICE ElementTerms element_terms(Divergence d, const ObjectiveParams& o, float q, float p, float r) {
  ElementTerms t{0.f, 0.f};
  switch (d) {
    case Divergence::kForwardKL:  // p (log p - log q); gradient q - p is formed directly
      t.loss = p > 0.f ? p * r : 0.f;
      break;
    case Divergence::kReverseKL:  // q (log q - log p); g = log q - log p
      t.loss = q > 0.f ? -q * r : 0.f;
      t.g = -r;
      break;
    case Divergence::kJSD: {
      // beta KL(p||m) + (1 - beta) KL(q||m). log(m/q) and log(m/p) are each formed directly (never as
      // a difference of two O(r) numbers), so the value stays accurate as beta -> 0 or 1.
      const float log_m_over_q = log_add_exp(o.log_one_minus_beta, o.log_beta + r);
      const float log_m_over_p = log_add_exp(o.log_beta, o.log_one_minus_beta - r);
      t.loss = (p > 0.f ? -o.beta * p * log_m_over_p : 0.f) - (q > 0.f ? o.one_minus_beta * q * log_m_over_q : 0.f);
      t.g = -o.one_minus_beta * log_m_over_q;
      break;
    }
    case Divergence::kSkewKL: {
      // m / p = alpha + (1 - alpha) e^-r; loss p log(p / m); g = -(1 - alpha) p / m.
      const float log_m_over_p = log_add_exp(o.log_alpha, o.log_one_minus_alpha - r);
      t.loss = p > 0.f ? -p * log_m_over_p : 0.f;
      t.g = -o.one_minus_alpha * expf(-log_m_over_p);
      break;
    }
    case Divergence::kSkewReverseKL: {
      // m / q = (1 - alpha) e^r + alpha; loss q log(q / m); g = log(q / m) + 1 - alpha q / m.
      const float log_m_over_q = log_add_exp(o.log_one_minus_alpha + r, o.log_alpha);
      t.loss = q > 0.f ? -q * log_m_over_q : 0.f;
      t.g = -log_m_over_q + 1.f - o.alpha * expf(-log_m_over_q);
      break;
    }
    case Divergence::kTVD:  // 1/2 |p - q|; g = 1/2 sign(q - p)
      t.loss = 0.5f * fabsf(p - q);
      t.g = r > 0.f ? -0.5f : (r < 0.f ? 0.5f : 0.f);
      break;
  }
  return t;
}

// d loss / d x_j from the element's g and the row's <q, g>.
DPKD_HOST_DEVICE float element_grad(Divergence d, float q, float p, float g, float qg) {
  if (d == Divergence::kForwardKL) return q - p;
  return q > 0.f ? q * (g - qg) : 0.f;
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
