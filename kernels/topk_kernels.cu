// Distillation from a top-k teacher on CUDA: one thread block per row. The teacher's ids are marked in a bitmap
// over the vocabulary (shared memory, V / 8 bytes), so one read of the row gathers the rest's softmax sums (tokens
// outside the ids) while the ids' own terms come from K threads; the K + 1 outcomes' math is topk_math.h's, shared
// with the CPU, in double. With the gradient, a second read of the row writes it. fp32 accumulation per entry,
// double per thread and across the block (CUB reductions).
#include <cub/block/block_reduce.cuh>

#include <cmath>
#include <stdexcept>

#include "distill/topk_math.h"
#include "distill_device.cuh"
#include "topk_cuda.h"

namespace dpkd::distill::cuda {
namespace {

constexpr int kThreads = 512;

// Softmax sums over a set of entries: the max, sum e and sum e (x - max) with e = exp(x - max) (the entropy's).
struct SoftmaxSums {
  float max;
  double sum, centered;
};

__device__ __forceinline__ void rescale(SoftmaxSums& a, float max) {  // the same sums against a larger max
  if (a.sum > 0.0) {
    const double shift = static_cast<double>(a.max) - max, factor = exp(shift);
    a.centered = (a.centered + shift * a.sum) * factor;
    a.sum *= factor;
  }
  a.max = max;
}

__device__ __forceinline__ void add(SoftmaxSums& a, float x) {
  if (x == -INFINITY) return;
  if (x > a.max) rescale(a, x);
  const float d = x - a.max, e = expf(d);  // NaN (a flagged row) passes into the sums
  a.sum += e;
  a.centered += static_cast<double>(e) * d;
}

__device__ __forceinline__ SoftmaxSums merge(SoftmaxSums a, SoftmaxSums b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const float m = fmaxf(a.max, b.max);
  rescale(a, m);
  rescale(b, m);
  return {m, a.sum + b.sum, a.centered + b.centered};
}

// Pass 1's per-thread results: the rest's sums over x = z / T, the raw logits' (hard-label term at T != 1), and
// whether a NaN or +inf logit was seen.
struct RowSums {
  SoftmaxSums rest, raw;
  int bad;
};
struct MergeRowSums {
  __device__ __forceinline__ RowSums operator()(const RowSums& a, const RowSums& b) const {
    return {merge(a.rest, b.rest), merge(a.raw, b.raw), a.bad | b.bad};
  }
};

// Sums over the ids: three doubles, a max and a flag (each K loop uses what it needs).
struct IdSums {
  double a, b, c;
  float max;
  int flag;
};
struct MergeIdSums {
  __device__ __forceinline__ IdSums operator()(const IdSums& x, const IdSums& y) const {
    return {x.a + y.a, x.b + y.b, x.c + y.c, fmaxf(x.max, y.max), x.flag | y.flag};
  }
};

__device__ __forceinline__ bool marked(const uint32_t* bits, int64_t j) { return (bits[j >> 5] >> (j & 31)) & 1u; }

template <class T>
__global__ void __launch_bounds__(kThreads) topk_kernel(const T* student, int64_t vocab, int64_t stride,
                                                        const int64_t* all_ids, const float* all_logprobs, int64_t k,
                                                        bool tail, const int64_t* labels, const float* grad_weight,
                                                        RowOptions o, float* loss, float* stats, T* grad_student,
                                                        int64_t grad_stride) {
  extern __shared__ uint32_t bits[];
  __shared__ int repeated;  // an id marked twice: a faulty teacher row, as an id out of range
  using ReduceRow = cub::BlockReduce<RowSums, kThreads>;
  using ReduceIds = cub::BlockReduce<IdSums, kThreads>;
  __shared__ union {
    typename ReduceRow::TempStorage row;
    typename ReduceIds::TempStorage ids;
  } temp;
  __shared__ RowSums row_result;
  __shared__ IdSums id_result;
  __shared__ double teacher_label;

  const int64_t i = blockIdx.x;
  const T* x = student + i * stride;
  const int64_t* ids = all_ids + i * k;
  const float* lp = all_logprobs + i * k;
  const float inv_t = 1.f / o.temperature;
  const int64_t l = labels ? labels[i] : -1;
  const int64_t label = labels && l != o.ignore_index && l >= 0 && l < vocab ? l : -1;
  const double w = o.hard_label_weight;
  const bool has_label = label >= 0, raw_needed = has_label && w > 0.0 && o.temperature != 1.f;
  auto in_range = [&](int64_t c) { return ids[c] >= 0 && ids[c] < vocab; };

  for (int64_t j = threadIdx.x; j < (vocab + 31) / 32; j += kThreads) bits[j] = 0u;
  if (threadIdx.x == 0) repeated = 0;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    const uint32_t bit = 1u << (ids[c] & 31);
    if (in_range(c) && (atomicOr(&bits[ids[c] >> 5], bit) & bit)) repeated = 1;
  }
  __syncthreads();

  // Pass 1 (reads the row).
  RowSums acc{{-INFINITY, 0.0, 0.0}, {-INFINITY, 0.0, 0.0}, 0};
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float z = to_float(x[j]);
    acc.bad |= !(z < INFINITY);
    if (raw_needed) add(acc.raw, z);
    if (!marked(bits, j)) add(acc.rest, z * inv_t);
  }
  const RowSums row_sums = ReduceRow(temp.row).Reduce(acc, MergeRowSums());
  if (threadIdx.x == 0) row_result = row_sums;
  __syncthreads();
  const SoftmaxSums rest = row_result.rest, raw = row_result.raw;

  // The ids: their largest tempered logit, the teacher's mass and faults (an id out of range, logprob_faulty).
  IdSums ia{0.0, 0.0, 0.0, -INFINITY, 0};
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    ia.max = fmaxf(ia.max, in_range(c) ? to_float(x[ids[c]]) * inv_t : -INFINITY);
    ia.a += exp(static_cast<double>(lp[c]));
    ia.flag |= !in_range(c) || logprob_faulty(lp[c]);
  }
  IdSums id_sums = ReduceIds(temp.ids).Reduce(ia, MergeIdSums());
  if (threadIdx.x == 0) id_result = id_sums;
  __syncthreads();
  const double mass = id_result.a, max_x = fmax(static_cast<double>(rest.max), static_cast<double>(id_result.max));
  const Divergence d = effective_divergence(o.objective);
  const bool teacher_nan = id_result.flag || repeated || mass_faulty(mass, tail, d, k, vocab);
  const bool student_bad = row_result.bad || !(max_x > -INFINITY);
  const double lp_rest = teacher_log_tail(tail, k, vocab, mass);
  auto x_of = [&](int64_t c) { return in_range(c) ? static_cast<double>(to_float(x[ids[c]]) * inv_t) : -INFINITY; };

  // The normaliser: the ids' sums against the row's max, joined with the rest's.
  ia = {0.0, 0.0, 0.0, -INFINITY, 0};
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    const double shift = x_of(c) - max_x, e = exp(shift);
    ia.a += e;
    ia.b += e > 0.0 ? e * shift : 0.0;
  }
  __syncthreads();  // every thread has read id_result, which thread 0 writes again below
  id_sums = ReduceIds(temp.ids).Reduce(ia, MergeIdSums());
  if (threadIdx.x == 0) {
    id_result = id_sums;
    teacher_label = lp_rest;  // a label outside the ids: the tail's log-mass (-inf without it)
  }
  __syncthreads();
  const bool has_rest = rest.sum > 0.0;
  const double rest_shift = static_cast<double>(rest.max) - max_x, rest_scale = has_rest ? exp(rest_shift) : 0.0;
  const double total = id_result.a + rest_scale * rest.sum, log_s = log(total);
  const double entropy_s =
      log_s - (id_result.b + (has_rest ? rest_scale * (rest.centered + rest_shift * rest.sum) : 0.0)) / total;
  const double lq_rest = has_rest ? rest_shift + log(rest.sum) - log_s : -INFINITY;

  // The divergence over the K + 1 outcomes.
  ia = {0.0, 0.0, 0.0, -INFINITY, 0};
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    const OutcomeTerms t = outcome_terms(d, o.objective, lp[c], (x_of(c) - max_x) - log_s);
    ia.a += t.loss;
    ia.b += t.h;
    ia.c += t.plogp;
    if (ids[c] == label) teacher_label = lp[c];
  }
  __syncthreads();  // as above
  id_sums = ReduceIds(temp.ids).Reduce(ia, MergeIdSums());
  if (threadIdx.x == 0) id_result = id_sums;
  __syncthreads();
  const OutcomeTerms r = outcome_terms(d, o.objective, lp_rest, lq_rest);
  const double div = id_result.a + r.loss, sum_h = id_result.b + r.h;
  // An infinite divergence (one that needs the tail, without it; the Python layer refuses that) has no gradient
  const bool row_nan = student_bad || teacher_nan, grad_nan = row_nan || !isfinite(sum_h);
  const float z_label = has_label ? to_float(x[label]) : -INFINITY;
  if (threadIdx.x == 0) {
    const double nan = __longlong_as_double(0x7ff8000000000000ll);
    const double raw_lse = raw_needed ? raw.max + log(raw.sum) : max_x + log_s;  // temperature 1: x = z
    float* st = stats + i * kNumStats;
    st[kStudentEntropy] = static_cast<float>(student_bad ? nan : entropy_s);
    st[kTeacherEntropy] = static_cast<float>(teacher_nan ? nan : -(id_result.c + r.plogp));
    st[kDivergence] = static_cast<float>(row_nan ? nan : div);
    st[kStudentLabelLogprob] =
        static_cast<float>(has_label && !student_bad ? (static_cast<double>(z_label * inv_t) - max_x) - log_s : nan);
    st[kTeacherLabelLogprob] = static_cast<float>(has_label && !teacher_nan ? teacher_label : nan);
    loss[i] = static_cast<float>((1.0 - w) * (row_nan ? nan : div) + (has_label ? w * (raw_lse - z_label) : 0.0));
  }
  if (grad_student == nullptr) return;

  // Pass 2 (reads the row again, writes its gradient): 0 for a row without weight, NaN for a faulty one.
  T* g = grad_student + i * grad_stride;
  const float g_out = grad_weight[i];
  if (g_out == 0.f || grad_nan) {
    const T fill = from_float<T>(g_out == 0.f ? 0.f : __int_as_float(0x7fc00000));
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) g[j] = fill;
    return;
  }
  const double a = g_out * (1.0 - w) / o.temperature, b = has_label ? g_out * w : 0.0;
  // Outside the ids: (q_j / q_R)(h_R - q_R S) a with q_j / q_R = exp(x_j - rest max) / rest sum, plus the hard-label
  // term b softmax(z)_j (at temperature 1 the tempered softmax: x = z).
  const float rest_coef = has_rest ? static_cast<float>((r.h - exp(lq_rest) * sum_h) * a / rest.sum) : 0.f;
  const float b_f = static_cast<float>(b), raw_log_sum = raw_needed ? static_cast<float>(log(raw.sum)) : 0.f;
  const float max_f = static_cast<float>(max_x), log_s_f = static_cast<float>(log_s);
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    if (marked(bits, j)) continue;  // the ids' entries: below
    const float z = to_float(x[j]), xt = z * inv_t;
    float v = z == -INFINITY ? 0.f : expf(xt - rest.max) * rest_coef;
    if (b_f != 0.f) {
      v += b_f * (raw_needed ? prob<ScalarMath>(z, raw.max, raw_log_sum) : prob<ScalarMath>(xt, max_f, log_s_f));
      if (j == label) v -= b_f;
    }
    g[j] = from_float<T>(v);
  }
  for (int64_t c = threadIdx.x; c < k; c += kThreads) {
    const double lq = (x_of(c) - max_x) - log_s;
    const double h = outcome_terms(d, o.objective, lp[c], lq).h;
    const double q_raw = raw_needed ? exp((static_cast<double>(to_float(x[ids[c]])) - raw.max) - raw_log_sum) : exp(lq);
    const double v = (h - exp(lq) * sum_h) * a + b * q_raw - (ids[c] == label ? b : 0.0);
    g[ids[c]] = from_float<T>(static_cast<float>(v));
  }
}

template <class T>
void launch(int64_t n_rows, const void* student, int64_t vocab, int64_t stride, const int64_t* ids,
            const float* logprobs, int64_t k, bool tail, const int64_t* labels, const float* grad_weight,
            const RowOptions& o, float* loss, float* stats, void* grad, int64_t grad_stride, cudaStream_t stream) {
  if (n_rows > 0x7fffffff) throw std::invalid_argument("dpkd top-k kernel: at most 2^31 - 1 rows per call");
  // Above 48 KB of shared memory, static and dynamic together, a kernel must ask for more
  static const size_t static_shared = [] {
    cudaFuncAttributes attributes;
    check(cudaFuncGetAttributes(&attributes, topk_kernel<T>), "dpkd top-k kernel attributes");
    return attributes.sharedSizeBytes;
  }();
  const size_t shared = static_cast<size_t>((vocab + 31) / 32) * sizeof(uint32_t);
  if (shared + static_shared > 48 * 1024) {
    check(cudaFuncSetAttribute(topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
          "dpkd top-k kernel: the vocabulary's bitmap does not fit the device's shared memory");
  }
  topk_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, shared, stream>>>(
      static_cast<const T*>(student), vocab, stride, ids, logprobs, k, tail, labels, grad_weight, o, loss, stats,
      static_cast<T*>(grad), grad_stride);
  check(cudaGetLastError(), "dpkd top-k kernel");
}

}  // namespace

void topk_forward(DType dtype, int64_t n_rows, const void* student, int64_t vocab, int64_t student_stride,
                  const int64_t* ids, const float* logprobs, int64_t k, bool tail, const int64_t* labels,
                  const float* grad_weight, const RowOptions& options, float* loss, float* stats, void* grad_student,
                  int64_t grad_stride, cudaStream_t stream) {
  if (n_rows == 0) return;
  auto run = [&](auto tag) {
    launch<decltype(tag)>(n_rows, student, vocab, student_stride, ids, logprobs, k, tail, labels, grad_weight,
                          options, loss, stats, grad_student, grad_stride, stream);
  };
  switch (dtype) {
    case DType::kFloat32: run(float{}); break;
    case DType::kBFloat16: run(__nv_bfloat16{}); break;
    case DType::kFloat16: run(__half{}); break;
  }
}

}  // namespace dpkd::distill::cuda
