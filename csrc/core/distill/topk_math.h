// Per-row math of a top-k teacher, shared by the CPU kernel (topk.cpp) and the CUDA kernel
// (kernels/topk_kernels.cu). The teacher is known on K ids (log-probabilities lp_k) and, with the tail, by its
// remaining mass p_R = 1 - sum_K p on one more outcome, the rest R of the vocabulary. Every objective is a sum of
// f(p_o, q_o) over outcomes, so the divergence is exactly the one of row_math.h's element_terms over the K + 1
// outcomes (without the tail p_R = 0: f(0, q_R) is what the student's mass outside K costs).
//
// With h_o = dD/d(log q_o) (each log q_o a free variable) and S = sum_o h_o, the gradient with respect to the
// student's tempered logits is h_k - q_k S on each k of K and (q_j / q_R)(h_R - q_R S) on each j outside K. The
// outcome terms are formed in double from the kernels' row normalisers, where h and q S may nearly cancel.
#pragma once

#include <math.h>
#include <stdint.h>

#include "distill/row_math.h"

namespace dpkd::distill {

// row_math's policy in double, for the K + 1 outcomes of a row.
struct DoubleMath {
  static DPKD_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static DPKD_HOST_DEVICE double log1p(double x) { return ::log1p(x); }
  static DPKD_HOST_DEVICE double max(double a, double b) { return fmax(a, b); }
  static DPKD_HOST_DEVICE double min(double a, double b) { return fmin(a, b); }
  static DPKD_HOST_DEVICE double abs(double x) { return fabs(x); }
  static DPKD_HOST_DEVICE double sign(double x) { return static_cast<double>((x > 0.0) - (x < 0.0)); }
  static DPKD_HOST_DEVICE double select(bool c, double a, double b) { return c ? a : b; }
};

struct OutcomeTerms {
  double loss;   // f(p_o, q_o)
  double h;      // dD/d(log q_o)
  double plogp;  // p_o log p_o (0 where p_o = 0), for the teacher's entropy
};

// One outcome's terms from the teacher's and the student's log-probabilities. `d`: effective_divergence's.
DPKD_HOST_DEVICE OutcomeTerms outcome_terms(Divergence d, const ObjectiveParams& o, double lp, double lq) {
  const double p = ::exp(lp), q = ::exp(lq);
  // r = log p - log q is NaN where both are 0: element_terms masks every term by p > 0 or q > 0
  const ElementTerms<double> e = element_terms<DoubleMath>(d, o, q, p, lp - lq, 0.f);
  // element_terms' g is d loss / d x over q; forward KL forms its gradient q - p directly, which assumes a
  // teacher of mass 1 (without the tail the ids may hold less): h = -p is its general form
  const double h = d == Divergence::kForwardKL ? -p : (q > 0.0 ? q * e.g : 0.0);
  return {e.loss, h, p > 0.0 ? p * lp : 0.0};
}

// Rounding slack for a teacher's log-probabilities and their mass (a softmax's certain token can come out at +1e-7):
// python/dpkd/topk.py's checks use the same.
constexpr double kLogProbSlack = 1e-3;

// A faulty teacher row, as the Python layer's checks define it (which raise; they are skipped under torch.compile,
// and a kernel must not compute a finite loss from such a row): a log-probability NaN or above 0 past the slack
// (logprob_faulty), mass above 1 past it, or, for a divergence infinite where the teacher has no mass (reverse KL)
// with the tail, no mass left for the tail while columns lie outside the ids.
DPKD_HOST_DEVICE bool logprob_faulty(float lp) { return !(lp <= kLogProbSlack); }
DPKD_HOST_DEVICE bool mass_faulty(double mass, bool tail, Divergence d, int64_t k, int64_t vocab) {
  return mass > 1.0 + kLogProbSlack || (tail && d == Divergence::kReverseKL && k < vocab && mass >= 1.0);
}

// The teacher's log-mass outside its ids: log(1 - sum_K p) with the tail (0 mass when rounding makes it
// negative), -inf without it or where the ids cover the vocabulary (no rest: 1 - sum p would be rounding).
DPKD_HOST_DEVICE double teacher_log_tail(bool tail, int64_t k, int64_t vocab, double mass) {
  return tail && k < vocab ? ::log(fmax(1.0 - mass, 0.0)) : -INFINITY;
}

}  // namespace dpkd::distill
