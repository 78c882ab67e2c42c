// Device-side pieces shared by the distillation kernels (distill_kernels.cu: one block per row, any
// layout; distill_cluster.cu: one Hopper thread-block cluster per row, the row held in registers):
// dtype conversion, 16-byte packs, log-sum-exp merging, and the per-element forward and gradient terms
// on top of row_math.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "distill/row_math.h"
#include "distill_cuda.h"

namespace dpkd::distill::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float f) { return __float2bfloat16(f); }
template <> __device__ __forceinline__ __half from_float<__half>(float f) { return __float2half(f); }

// A float kept in a logit's 16-bit slot as bf16 (an fp16 slot holds the bf16 bits: fp16's range and subnormals
// would lose large and tiny values), exactly in an fp32 slot.
template <class T>
__device__ __forceinline__ T keep_in_slot(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else {
    const __nv_bfloat16 b = __float2bfloat16(f);
    T slot;
    memcpy(&slot, &b, sizeof slot);
    return slot;
  }
}
template <class T>
__device__ __forceinline__ float kept_in_slot(T slot) {
  if constexpr (std::is_same_v<T, float>) {
    return slot;
  } else {
    __nv_bfloat16 b;
    memcpy(&b, &slot, sizeof b);
    return __bfloat162float(b);
  }
}

// 16 bytes of logits: one vector load or store.
template <class T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// P gradient values of a logit pack, converted to G and written by one 16- or 8-byte store (written out: the
// compiler splits a store of an assembled pack). G may be narrower than the logits (fp32 logits, bf16 gradient).
template <class G, int P>
__device__ __forceinline__ void store_values(G* dst, const float (&v)[P]) {
  constexpr int kWords = P * static_cast<int>(sizeof(G)) / 4;
  static_assert(kWords == 4 || kWords == 2, "a store of 16 or 8 bytes");
  uint32_t w[kWords];
  if constexpr (sizeof(G) == 4) {
#pragma unroll
    for (int k = 0; k < kWords; ++k) memcpy(&w[k], &v[k], 4);
  } else {
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const G lo_value = from_float<G>(v[2 * k]), hi_value = from_float<G>(v[2 * k + 1]);
      uint16_t lo, hi;
      memcpy(&lo, &lo_value, 2);
      memcpy(&hi, &hi_value, 2);
      w[k] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    }
  }
  if constexpr (kWords == 4) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(w[0]), "r"(w[1]) : "memory");
  }
}

// Rows that can be read and written as whole packs: 16-byte aligned base and a row stride of whole packs.
template <class T>
inline bool packs_aligned(const void* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride % Pack<T>::kSize == 0;
}

// A gradient of element type G written as store_values<G, P> (P: the logits' pack size).
template <class G, int P>
inline bool values_aligned(const void* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % (P * sizeof(G)) == 0 && stride % P == 0;
}

// 16-bit logits carry 3 significant digits: the hardware exp2/log2 approximations (relative error near
// 1e-7, growing to ~1e-6 for |x| ~ 50) are far below that and cut the per-element instruction count,
// which bounds these kernels, about in half. fp32 logits keep the accurate library functions unless
// RowOptions::fast_math says they hold no more than 16-bit factors' precision (dispatch_math).
// The flush-to-zero forms: without ftz, ex2.approx and lg2.approx each take a guard for subnormal values
// (a compare, two predicated multiplies, the predicates kept across the unrolled loop), which was half of
// the instructions of the cluster kernel's first pass (SASS, sm_90a). exp flushes results below FLT_MIN
// (1.2e-38) to 0: a probability that small adds nothing a float sum holds. log's arguments are >= 1
// (log1p) or clamped to FLT_MIN by the caller.
constexpr float kLog2e = 1.44269504f, kLn2 = 0.693147181f;

struct FastMath : ScalarMath {
  static __device__ __forceinline__ float exp2(float x) {  // exp2(-inf) = +0
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  }
  static __device__ __forceinline__ float exp(float x) { return exp2(x * kLog2e); }
  static __device__ __forceinline__ float log2(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  }
  static __device__ __forceinline__ float log(float x) { return log2(x) * kLn2; }
  static __device__ __forceinline__ float log1p(float x) {  // x >= 0 here (log1p of an exp)
    const float u = 1.f + x;  // log(u) * x / (u - 1) corrects for the rounding of 1 + x
    return u == 1.f ? x : log(u) * __fdividef(x, u - 1.f);
  }
};

// f(T{}, G{}, M{}) for the logits' element type T, the gradient's G and the math M the kernels use. G is T, or
// bf16 / fp16 for fp32 logits under fast math (the fused head's fp32 logits of 16-bit factors, whose gradient
// goes straight into a 16-bit matmul: written in 16 bits here, it takes no conversion pass); the torch layer
// checks that before calling.
template <class F>
void dispatch_math(DType dtype, bool fast_math, DType grad_dtype, F&& f) {
  if (grad_dtype != dtype && !(dtype == DType::kFloat32 && fast_math))
    throw std::invalid_argument("dpkd: a gradient dtype other than the logits' needs fp32 logits and fast math");
  switch (dtype) {
    case DType::kFloat32:
      if (!fast_math) {
        f(float{}, float{}, ScalarMath{});
      } else if (grad_dtype == DType::kBFloat16) {
        f(float{}, __nv_bfloat16{}, FastMath{});
      } else if (grad_dtype == DType::kFloat16) {
        f(float{}, __half{}, FastMath{});
      } else {
        f(float{}, float{}, FastMath{});
      }
      break;
    case DType::kBFloat16: f(__nv_bfloat16{}, __nv_bfloat16{}, FastMath{}); break;
    case DType::kFloat16: f(__half{}, __half{}, FastMath{}); break;
  }
}

// A failed launch or CUDA call as a C++ exception (the torch layer turns it into a Python error).
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// A running (max, sum of exp(x - max)) pair and its merge: the log-sum-exp as a reduction.
struct MaxSum {
  float max;
  float sum;
};
__device__ __forceinline__ MaxSum merge(const MaxSum& a, const MaxSum& b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}
struct MergeMaxSum {
  __device__ __forceinline__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const { return merge(a, b); }
};
template <class M>
__device__ __forceinline__ void add(MaxSum& acc, float x) {
  if (x == -INFINITY) return;
  if (x > acc.max) {
    acc.sum = acc.sum * M::exp(acc.max - x) + 1.f;
    acc.max = x;
  } else {
    acc.sum += M::exp(x - acc.max);
  }
}

struct Sum4 {
  float a, b, c, d;
};
__device__ __forceinline__ Sum4 operator+(const Sum4& x, const Sum4& y) {
  return {x.a + y.a, x.b + y.b, x.c + y.c, x.d + y.d};
}
struct AddSum4 {
  __device__ __forceinline__ Sum4 operator()(const Sum4& x, const Sum4& y) const { return x + y; }
};

// A row's max or log-sum as probabilities are formed against them under FastMath: the -inf of a row without a
// finite logit becomes 0, so that exp2 of a -inf entry is 0 without a branch per entry (NaN stays NaN).
__device__ __forceinline__ float finite_or_zero(float v) { return v == -INFINITY ? 0.f : v; }

// log2 of a probability under FastMath: (x - max) log2(e) - log_sum log2(e) as one fma, from finite_or_zero(max)
// and -finite_or_zero(log_sum) * log2(e), loop invariants (RowContext holds them per row); -inf for x = -inf.
__device__ __forceinline__ float log2_prob(float x, float shift, float neg_log2_sum) {
  return fmaf(x - shift, kLog2e, neg_log2_sum);
}

// exp((x - max) - log_sum), 0 for x = -inf. FastMath: the hardware exp2 of log2_prob, no branch.
template <class M>
__device__ __forceinline__ float prob_from(float x, float shift, float neg_log2_sum, float max, float log_sum) {
  if constexpr (std::is_same_v<M, FastMath>) {
    return FastMath::exp2(log2_prob(x, shift, neg_log2_sum));
  } else {
    return x == -INFINITY ? 0.f : M::exp((x - max) - log_sum);
  }
}
template <class M>
__device__ __forceinline__ float prob(float x, float max, float log_sum) {
  return prob_from<M>(x, finite_or_zero(max), -finite_or_zero(log_sum) * kLog2e, max, log_sum);
}

// lse_s - lse_t with lse = max + log_sum, the maxima's difference taken first: each lse rounded alone carries
// an error of ulp(max) (1e-3 at logits of 1e4, 4e-6 at 30), which a small divergence would inherit in full.
// The CPU forms it in double (objectives.cpp).
__device__ __forceinline__ float lse_difference(float max_s, float log_sum_s, float max_t, float log_sum_t) {
  return (max_s - max_t) + (log_sum_s - log_sum_t);
}

// A row's log-sum-exps and objective once the first pass is done: everything the per-element terms need.
struct RowContext {
  Divergence d;
  ObjectiveParams objective;
  float max_s, log_sum_s, max_t, log_sum_t;
  float c;          // lse_s - lse_t
  float qg;         // <q, g - g_ref>, known after the second pass
  float g_ref;      // g at the student's most likely entry (row_math.h's kGRef), 0 for the single-pass KLs
  float shift_s, neg_log2_sum_s, shift_t, neg_log2_sum_t;  // prob_from's per-row constants

  __device__ RowContext(Divergence d, const ObjectiveParams& objective, float max_s, float log_sum_s, float max_t,
                        float log_sum_t, float qg = 0.f, float g_ref = 0.f)
      : d(d), objective(objective), max_s(max_s), log_sum_s(log_sum_s), max_t(max_t), log_sum_t(log_sum_t),
        c(lse_difference(max_s, log_sum_s, max_t, log_sum_t)), qg(qg), g_ref(g_ref),
        shift_s(finite_or_zero(max_s)), neg_log2_sum_s(-finite_or_zero(log_sum_s) * kLog2e),
        shift_t(finite_or_zero(max_t)), neg_log2_sum_t(-finite_or_zero(log_sum_t) * kLog2e) {}
  template <class M>
  __device__ float q(float x) const { return prob_from<M>(x, shift_s, neg_log2_sum_s, max_s, log_sum_s); }
  template <class M>
  __device__ float p(float y) const { return prob_from<M>(y, shift_t, neg_log2_sum_t, max_t, log_sum_t); }
};

// The student's largest transformed logit x and the teacher's y at the same entry: where g_ref is taken.
// The merge keeps the first operand on ties, so a fixed reduction order gives every block the same entry
// (any entry would do: the forward and backward passes both read the saved g_ref).
struct Peak {
  float x, y;
};
__device__ __forceinline__ Peak merge(const Peak& a, const Peak& b) { return b.x > a.x ? b : a; }
struct MergePeak {
  __device__ __forceinline__ Peak operator()(const Peak& a, const Peak& b) const { return merge(a, b); }
};

// The JSD under FastMath (16-bit logits, or fp32 ones with RowOptions::fast_math) away from its KL endpoints
// takes its log form: log m is taken once (one hardware log2) and log(m/q), log(m/p) formed against
// log q = x - lse_s and log p = y - lse_t, about 1e-5 off in absolute terms (|log q| ~ 50 at most times the
// log2 approximation's error), where row_math.h's exact form spends two exp-log1p pairs per entry. Near
// beta = 0 or 1 the JSD is a small multiple of a KL and that absolute error would be a large relative one:
// the exact form stays.
__host__ __device__ inline bool jsd_log_form(Divergence d, const ObjectiveParams& o, bool fast_math) {
  return fast_math && d == Divergence::kJSD && o.beta >= 1e-3f && o.one_minus_beta >= 1e-3f;
}

// How terms() chooses between the JSD's log form and row_math.h's element_terms: per call (the one-block
// kernels), or fixed by the caller (the cluster kernel, whose loops then hold one form's code and no branch).
enum class Form { kPerCall, kJsdLog, kGeneric };

// The log form's terms. Finite where both probabilities are 0 too (m is clamped to FLT_MIN, and each term
// selects 0), so its callers need no branch per entry. The clamp moves only terms below 1e-35: m < FLT_MIN
// needs p and q below FLT_MIN / 1e-3. It keeps a NaN m (a row with NaN or +inf logits): fmaxf would not.
// In log2 units: log2 q and log2 p are the very exponents q and p were formed from (log2_prob, formed once), so the
// logs and the probabilities agree; one multiplication by ln 2 per term instead of per log.
__device__ __forceinline__ ElementTerms<float> jsd_log_terms(const RowContext& r, float x, float y, float q, float p) {
  const ObjectiveParams& o = r.objective;
  const float log2_q = log2_prob(x, r.shift_s, r.neg_log2_sum_s), log2_p = log2_prob(y, r.shift_t, r.neg_log2_sum_t);
  const float m = o.beta * p + o.one_minus_beta * q;
  const float log2_m = FastMath::log2(m < 1.17549435e-38f ? 1.17549435e-38f : m);
  const float loss2 = (p > 0.f ? o.beta * p * (log2_p - log2_m) : 0.f) +
                      (q > 0.f ? o.one_minus_beta * q * (log2_q - log2_m) : 0.f);
  return {kLn2 * loss2, (o.one_minus_beta * kLn2) * (log2_q - log2_m)};
}

template <class M, Form F>
__device__ __forceinline__ ElementTerms<float> terms(const RowContext& r, float x, float y, float q, float p) {
  constexpr bool fast = std::is_same_v<M, FastMath>;
  static_assert(fast || F != Form::kJsdLog, "the JSD's log form is FastMath's");
  if constexpr (F == Form::kJsdLog) {
    return jsd_log_terms(r, x, y, q, p);
  } else {
    if (F == Form::kPerCall && jsd_log_form(r.d, r.objective, fast)) return jsd_log_terms(r, x, y, q, p);
    return element_terms<M>(r.d, r.objective, q, p, y - x, r.c);
  }
}

// g at the peak entry, from the row's log-sum-exps: r.g_ref for the two-pass objectives (0 for an all -inf row).
template <class M, Form F = Form::kPerCall>
__device__ __forceinline__ float g_at(const RowContext& r, const Peak& peak) {
  if (peak.x == -INFINITY) return 0.f;
  const float q = r.q<M>(peak.x), p = r.p<M>(peak.y);
  return terms<M, F>(r, peak.x, peak.y, q, p).g;
}

// One entry's contribution to (divergence, <q, g - g_ref>, sum q (x - max_s), sum p (y - max_t)) for transformed
// logits x and y (the entropies' sums against the maxima: sum q x near logits of 1e4 carries ulp(1e4) per term);
// returns the entry's g - g_ref (0, or for the log form any value, where both probabilities are 0: the
// gradient's select on q > 0 never reads it there).
template <class M, Form F = Form::kPerCall>
__device__ __forceinline__ float accumulate_terms(Sum4& part, const RowContext& r, float x, float y) {
  const float q = r.q<M>(x), p = r.p<M>(y);
  if (F != Form::kJsdLog && q == 0.f && p == 0.f) return 0.f;
  const ElementTerms<float> e = terms<M, F>(r, x, y, q, p);
  const float g = e.g - r.g_ref;
  part.a += e.loss;
  part.b += q > 0.f ? q * g : 0.f;
  part.c += q > 0.f ? q * (x - r.shift_s) : 0.f;
  part.d += p > 0.f ? p * (y - r.shift_t) : 0.f;
  return g;
}

// d divergence / d x for one entry.
template <class M, Form F = Form::kPerCall>
__device__ __forceinline__ float divergence_grad(const RowContext& r, float x, float y) {
  const float q = r.q<M>(x), p = r.p<M>(y);
  if (F != Form::kJsdLog && q == 0.f && p == 0.f) return 0.f;
  const ElementTerms<float> e = terms<M, F>(r, x, y, q, p);
  return element_grad<M>(r.d, q, p, e.g - r.g_ref, r.qg);
}

// The same for a two-pass objective D from the entry's g - g_ref, as accumulate_terms returned it: one exp
// instead of the objective's terms. p is not needed: only forward KL's gradient (q - p) reads it.
template <class M, Divergence D>
__device__ __forceinline__ float divergence_grad_from_g(const RowContext& r, float x, float g_minus_ref) {
  static_assert(D != Divergence::kForwardKL && D != Divergence::kReverseKL, "the KLs take one pass and keep no g");
  return element_grad<M>(D, r.q<M>(x), 0.f, g_minus_ref, r.qg);
}

// TAID: the teacher's logits become mix z_t + (1 - mix) z_s.
__device__ __forceinline__ float mix_teacher(float mix, float zt, float zs) {
  return mix == 1.f ? zt : (mix == 0.f ? zs : mix * zt + (1.f - mix) * zs);
}

// Everything a finished row writes: its loss, statistics and the state the backward pass reads.
struct RowSummary {
  RowContext ctx;
  Sum4 total;  // (divergence, <q, g - g_ref>, sum q (x - max_s), sum p (y - max_t))
  bool bad_s, bad_t;
  float mean_s, scale_s, mean_t, scale_t, std_s, count_s, raw_max, raw_log_sum;
  float student_label_logit = 0.f, teacher_label_logit = 0.f;  // raw (teacher: after TAID mixing)
};

__device__ inline void write_row(const RowSummary& r, int64_t i, bool has_labels, bool has_label,
                                 const RowOptions& o, float* loss, float* stats, float* state) {
  const float nan = __int_as_float(0x7fc00000);
  float* st = stats + i * kNumStats;
  // NaN for NaN or +inf logits and for a row without a finite logit, whose divergence and loss are NaN too, as on
  // the CPU (objectives.cpp). Each difference with a log-sum-exp starts from its max, which the other operand is
  // near (see lse_difference).
  const bool no_distribution = !(r.ctx.max_s > -INFINITY) || !(r.ctx.max_t > -INFINITY);
  st[kStudentEntropy] = r.bad_s || !(r.ctx.max_s > -INFINITY) ? nan : r.ctx.log_sum_s - r.total.c;
  st[kTeacherEntropy] = r.bad_t || !(r.ctx.max_t > -INFINITY) ? nan : r.ctx.log_sum_t - r.total.d;
  st[kDivergence] = no_distribution ? nan : r.total.a;
  if (has_label) {
    st[kStudentLabelLogprob] = ((r.student_label_logit - r.mean_s) * r.scale_s - r.ctx.max_s) - r.ctx.log_sum_s;
    st[kTeacherLabelLogprob] = ((r.teacher_label_logit - r.mean_t) * r.scale_t - r.ctx.max_t) - r.ctx.log_sum_t;
    const float ce = (r.raw_max - r.student_label_logit) + r.raw_log_sum;
    loss[i] = no_distribution            ? nan
              : o.hard_label_weight > 0.f ? (1.f - o.hard_label_weight) * r.total.a + o.hard_label_weight * ce
                                          : r.total.a;
  } else {
    st[kStudentLabelLogprob] = nan;
    st[kTeacherLabelLogprob] = nan;
    loss[i] = has_labels ? 0.f : no_distribution ? nan : r.total.a;
  }
  float* rs = state + i * kRowState;
  for (int k = 0; k < kRowState; ++k) rs[k] = 0.f;
  rs[kMaxS] = r.ctx.max_s;
  rs[kLogSumS] = r.ctx.log_sum_s;
  rs[kMaxT] = r.ctx.max_t;
  rs[kLogSumT] = r.ctx.log_sum_t;
  rs[kQG] = r.total.b;
  rs[kMeanS] = r.mean_s;
  rs[kScaleS] = r.scale_s;
  rs[kMeanT] = r.mean_t;
  rs[kScaleT] = r.scale_t;
  rs[kStdS] = r.std_s;
  rs[kCountS] = r.count_s;
  rs[kRawMax] = r.raw_max;
  rs[kRawLogSum] = r.raw_log_sum;
  rs[kGRef] = r.ctx.g_ref;
}

// A row the forward-with-gradient skips because its weight is 0, as the CPU op does: loss 0, statistics
// NaN, zero row state (its gradient row is written as zeros by the caller).
__device__ inline void write_skipped_row(int64_t i, float* loss, float* stats, float* state) {
  loss[i] = 0.f;
  for (int k = 0; k < kNumStats; ++k) stats[i * kNumStats + k] = __int_as_float(0x7fc00000);
  for (int k = 0; k < kRowState; ++k) state[i * kRowState + k] = 0.f;
}

// The gradient of a row's loss with respect to one raw student logit zs (no standardization): the
// divergence part dx() = d divergence / d x, scaled by a = (1 - w) dL, and the hard-label part by b = w dL.
// Computed for -inf entries too and then selected away, so that no entry branches (dx() may be NaN there).
// kHardLabel false: the caller knows b = 0.
template <class M, bool kHardLabel = true, class DivergenceGrad>
__device__ __forceinline__ float raw_grad(float zs, DivergenceGrad&& dx, float a, float b, float scale_s, float raw_max,
                                          float raw_log_sum, bool is_label) {
  float gz = a * scale_s * dx();
  if (kHardLabel && b != 0.f) gz += b * (prob<M>(zs, raw_max, raw_log_sum) - (is_label ? 1.f : 0.f));
  return zs > -INFINITY ? gz : 0.f;  // 0 for -inf and NaN entries, as on the CPU
}

}  // namespace dpkd::distill::cuda
