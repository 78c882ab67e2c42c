// Fused distillation objectives on CUDA: one thread block per row, the vocabulary streamed by the
// block's threads, CUB block reductions, fp32 accumulation. The per-element math is row_math.h's,
// shared with the CPU kernels.
//
// Forward: (standardization: mean and std, 2 reads,) log-sum-exp of both models, then the loss / <q, g> / entropy
// pass: 2 reads of each row (4 with standardization). Backward: 1 read of each row and 1 write of the
// gradient (2 reads with standardization). Rows with zero upstream gradient only write zeros, and the
// forward-with-gradient skips rows of zero weight altogether.
#include <cub/block/block_reduce.cuh>

#include <cmath>
#include <stdexcept>
#include <string>

#include "distill_cuda.h"
#include "distill_device.cuh"

namespace dpkd::distill::cuda {
namespace {

constexpr int kThreads = 512;

template <class T>
struct RowIn {
  const T* s;
  const T* t;
  int64_t vs, vt;
  float mix;
  __device__ __forceinline__ float student(int64_t j) const { return j < vs ? to_float(s[j]) : -INFINITY; }
  __device__ __forceinline__ float teacher(int64_t j, float zs) const {
    return mix_teacher(mix, j < vt ? to_float(t[j]) : -INFINITY, zs);
  }
};

template <class T, class M>
__global__ void __launch_bounds__(kThreads) forward_kernel(int64_t n_rows, const T* student, int64_t vs, int64_t s_stride,
                                                           const T* teacher, int64_t vt, int64_t t_stride,
                                                           const int64_t* labels, RowOptions o, float* loss,
                                                           float* stats, float* state, const float* skip_if_zero) {
  using ReduceMaxSum = cub::BlockReduce<MaxSum, kThreads>;
  using ReduceSum4 = cub::BlockReduce<Sum4, kThreads>;
  using ReducePeak = cub::BlockReduce<Peak, kThreads>;
  __shared__ union {
    typename ReduceMaxSum::TempStorage max_sum;
    typename ReduceSum4::TempStorage sum4;
    typename ReducePeak::TempStorage peak;
  } temp;
  __shared__ float shared[10];

  const int64_t i = blockIdx.x;
  if (i >= n_rows) return;
  if (skip_if_zero != nullptr && skip_if_zero[i] == 0.f) {
    if (threadIdx.x == 0) write_skipped_row(i, loss, stats, state);
    return;
  }
  const RowIn<T> row{student + i * s_stride, teacher + i * t_stride, vs, vt, o.teacher_mix};
  const int64_t width = vs > vt ? vs : vt;
  const float inv_t = 1.f / o.temperature;

  // Standardization: mean, then population std, over finite entries, per model (two passes: a
  // single-pass E[z^2] - mean^2 would cancel catastrophically in fp32 for large logits).
  float mean_s = 0.f, scale_s = inv_t, mean_t = 0.f, scale_t = inv_t, std_s = 0.f, count_s = static_cast<float>(vs);
  if (o.standardize) {
    Sum4 m{0.f, 0.f, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < width; j += kThreads) {
      const float zs = row.student(j), zt = row.teacher(j, zs);
      if (isfinite(zs)) { m.a += 1.f; m.b += zs; }
      if (isfinite(zt)) { m.c += 1.f; m.d += zt; }
    }
    const Sum4 sums = ReduceSum4(temp.sum4).Reduce(m, AddSum4());
    if (threadIdx.x == 0) {  // a row without finite entries: mean and std 0, as on the CPU
      shared[0] = sums.a > 0.f ? sums.b / sums.a : 0.f;
      shared[2] = sums.c > 0.f ? sums.d / sums.c : 0.f;
      shared[4] = sums.a;
      shared[5] = sums.c;
    }
    __syncthreads();
    mean_s = shared[0];
    mean_t = shared[2];
    count_s = shared[4];
    const float count_t = shared[5];
    Sum4 v{0.f, 0.f, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < width; j += kThreads) {
      const float zs = row.student(j), zt = row.teacher(j, zs);
      if (isfinite(zs)) v.a += (zs - mean_s) * (zs - mean_s);
      if (isfinite(zt)) v.b += (zt - mean_t) * (zt - mean_t);
    }
    __syncthreads();
    const Sum4 vars = ReduceSum4(temp.sum4).Reduce(v, AddSum4());
    if (threadIdx.x == 0) {
      shared[1] = count_s > 0.f ? sqrtf(vars.a / count_s) : 0.f;
      shared[3] = count_t > 0.f ? sqrtf(vars.b / count_t) : 0.f;
    }
    __syncthreads();
    std_s = shared[1];
    scale_s = inv_t / (std_s + o.standardize_eps);
    scale_t = inv_t / (shared[3] + o.standardize_eps);
  }

  const bool has_label = labels != nullptr && labels[i] != o.ignore_index;
  const int64_t label = has_label ? labels[i] : -1;
  const bool raw_needed = has_label && o.hard_label_weight > 0.f && (o.standardize || o.temperature != 1.f);

  // Pass 1: log-sum-exps, and the two-pass objectives' peak entry; NaN or +inf in a row is flagged
  // through the entropy statistics.
  const Divergence d = effective_divergence(o.objective);
  const bool two_pass = d != Divergence::kForwardKL && d != Divergence::kReverseKL;
  MaxSum acc_s{-INFINITY, 0.f}, acc_t{-INFINITY, 0.f}, acc_raw{-INFINITY, 0.f};
  Peak peak{-INFINITY, -INFINITY};
  float bad_s = 0.f, bad_t = 0.f;
  for (int64_t j = threadIdx.x; j < width; j += kThreads) {
    const float zs = row.student(j), zt = row.teacher(j, zs);
    const float x = (zs - mean_s) * scale_s, y = (zt - mean_t) * scale_t;
    bad_s += !(zs < INFINITY);
    bad_t += !(zt < INFINITY);
    if (raw_needed) add<M>(acc_raw, zs);
    if (two_pass && x > peak.x) peak = {x, y};
    add<M>(acc_s, x);
    add<M>(acc_t, y);
  }
  __syncthreads();
  const MaxSum ls = ReduceMaxSum(temp.max_sum).Reduce(acc_s, MergeMaxSum());
  __syncthreads();
  const MaxSum lt = ReduceMaxSum(temp.max_sum).Reduce(acc_t, MergeMaxSum());
  __syncthreads();
  const MaxSum lr = raw_needed ? ReduceMaxSum(temp.max_sum).Reduce(acc_raw, MergeMaxSum()) : MaxSum{0.f, 0.f};
  __syncthreads();
  const Peak row_peak = two_pass ? ReducePeak(temp.peak).Reduce(peak, MergePeak()) : peak;
  __syncthreads();
  const Sum4 bad = ReduceSum4(temp.sum4).Reduce(Sum4{bad_s, bad_t, 0.f, 0.f}, AddSum4());
  if (threadIdx.x == 0) {
    shared[0] = ls.max;
    shared[1] = logf(ls.sum);
    shared[2] = lt.max;
    shared[3] = logf(lt.sum);
    shared[4] = raw_needed ? lr.max : ls.max;
    shared[5] = raw_needed ? logf(lr.sum) : logf(ls.sum);
    shared[6] = bad.a;
    shared[7] = bad.b;
    shared[8] = row_peak.x;
    shared[9] = row_peak.y;
  }
  __syncthreads();
  const float max_s = shared[0], log_sum_s = shared[1], max_t = shared[2], log_sum_t = shared[3];
  const float raw_max = shared[4], raw_log_sum = shared[5];
  const bool row_bad_s = shared[6] > 0.f, row_bad_t = shared[7] > 0.f;

  // Pass 2: divergence, <q, g - g_ref>, sum q x, sum p y.
  RowContext ctx(d, o.objective, max_s, log_sum_s, max_t, log_sum_t);
  if (two_pass) ctx.g_ref = g_at<M>(ctx, Peak{shared[8], shared[9]});
  Sum4 part{0.f, 0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < width; j += kThreads) {
    const float zs = row.student(j), zt = row.teacher(j, zs);
    accumulate_terms<M>(part, ctx, (zs - mean_s) * scale_s, (zt - mean_t) * scale_t);
  }
  __syncthreads();
  const Sum4 total = ReduceSum4(temp.sum4).Reduce(part, AddSum4());
  if (threadIdx.x == 0) {
    RowSummary r{ctx, total, row_bad_s, row_bad_t, mean_s, scale_s, mean_t, scale_t, std_s, count_s, raw_max,
                 raw_log_sum};
    if (has_label) {
      const float zl = row.student(label);
      r.student_label_logit = zl;
      r.teacher_label_logit = row.teacher(label, zl);
    }
    write_row(r, i, labels != nullptr, has_label, o, loss, stats, state);
  }
}

// `vectorized`: no standardization, equal vocabularies and 16-byte aligned rows, so whole packs are read
// and written. G: the gradient's element type (dispatch_math).
template <class T, class G, class M>
__global__ void __launch_bounds__(kThreads) backward_kernel(int64_t n_rows, const float* grad_loss, const T* student,
                                                            int64_t vs, int64_t s_stride, const T* teacher, int64_t vt,
                                                            int64_t t_stride, const int64_t* labels,
                                                            const float* state, RowOptions o, G* grad,
                                                            int64_t g_stride, bool vectorized) {
  using ReduceSum4 = cub::BlockReduce<Sum4, kThreads>;
  __shared__ typename ReduceSum4::TempStorage temp;
  __shared__ float shared[2];

  const int64_t i = blockIdx.x;
  if (i >= n_rows) return;
  G* out = grad + i * g_stride;
  const bool has_label = labels != nullptr && labels[i] != o.ignore_index;
  const float gl = grad_loss[i];
  if (gl == 0.f || (labels != nullptr && !has_label)) {
    for (int64_t j = threadIdx.x; j < vs; j += kThreads) out[j] = from_float<G>(0.f);
    return;
  }
  const RowIn<T> row{student + i * s_stride, teacher + i * t_stride, vs, vt, o.teacher_mix};
  const float* st = state + i * kRowState;
  const float w = has_label ? o.hard_label_weight : 0.f;
  const float a = (1.f - w) * gl, b = w * gl;
  const int64_t label = has_label ? labels[i] : -1;
  const RowContext ctx(effective_divergence(o.objective), o.objective, st[kMaxS], st[kLogSumS], st[kMaxT],
                       st[kLogSumT], st[kQG], st[kGRef]);
  const float mean_s = st[kMeanS], scale_s = st[kScaleS], mean_t = st[kMeanT], scale_t = st[kScaleT];
  // Read once: the gradient stores' memory clobber would make the compiler reload them for every entry.
  const float raw_max = st[kRawMax], raw_log_sum = st[kRawLogSum];

  if (vectorized) {
    constexpr int P = Pack<T>::kSize;
    const int64_t packs = vs / P;
    for (int64_t k = threadIdx.x; k < packs; k += kThreads) {
      const Pack<T> ps = reinterpret_cast<const Pack<T>*>(row.s)[k], pt = reinterpret_cast<const Pack<T>*>(row.t)[k];
      float gz[P];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float zs = to_float(ps.v[e]), zt = mix_teacher(o.teacher_mix, to_float(pt.v[e]), zs);
        gz[e] = raw_grad<M>(zs, [&] { return divergence_grad<M>(ctx, zs * scale_s, zt * scale_t); }, a, b, scale_s,
                            raw_max, raw_log_sum, k * P + e == label);
      }
      store_values<G>(out + k * P, gz);
    }
    for (int64_t j = packs * P + threadIdx.x; j < vs; j += kThreads) {
      const float zs = row.student(j);
      out[j] = from_float<G>(raw_grad<M>(
          zs, [&] { return divergence_grad<M>(ctx, zs * scale_s, row.teacher(j, zs) * scale_t); }, a, b, scale_s,
          raw_max, raw_log_sum, j == label));
    }
    return;
  }

  auto grad_x = [&](int64_t j, float zs) {
    return divergence_grad<M>(ctx, (zs - mean_s) * scale_s, (row.teacher(j, zs) - mean_t) * scale_t);
  };
  float g1_mean = 0.f, g2_term = 0.f;
  if (o.standardize) {
    Sum4 part{0.f, 0.f, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < vs; j += kThreads) {
      const float zs = row.student(j);
      if (!isfinite(zs)) continue;
      const float gx = grad_x(j, zs);
      part.a += gx;
      part.b += gx * (zs - mean_s);
    }
    const Sum4 total = ReduceSum4(temp).Reduce(part, AddSum4());
    if (threadIdx.x == 0) {
      shared[0] = st[kCountS] > 0.f ? total.a / st[kCountS] : 0.f;
      const float sd = st[kStdS];
      shared[1] = sd > 0.f ? total.b / (st[kCountS] * sd * (sd + o.standardize_eps)) : 0.f;
    }
    __syncthreads();
    g1_mean = shared[0];
    g2_term = shared[1];
  }
  for (int64_t j = threadIdx.x; j < vs; j += kThreads) {
    const float zs = row.student(j);
    float gz = 0.f;
    if (zs > -INFINITY) {
      const float gx = grad_x(j, zs);
      gz = a * scale_s * (o.standardize ? gx - g1_mean - (zs - mean_s) * g2_term : gx);
      if (b != 0.f) gz += b * (prob<M>(zs, raw_max, raw_log_sum) - (j == label ? 1.f : 0.f));
    }
    out[j] = from_float<G>(gz);
  }
}

// Each block reads the scale and returns at once when it is 1: the common loss.backward() costs a launch.
template <class T>
__global__ void scale_kernel(T* x, int64_t n, const float* scale) {
  const float s = *scale;
  if (s == 1.f) return;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[j] = from_float<T>(to_float(x[j]) * s);
}

}  // namespace

void forward(DType dtype, int64_t n_rows, const void* student, int64_t student_vocab, int64_t student_stride,
             const void* teacher, int64_t teacher_vocab, int64_t teacher_stride, const int64_t* labels,
             const RowOptions& options, float* loss, float* stats, float* row_state, const float* grad_weight,
             void* grad_student, int64_t grad_stride, DType grad_dtype, cudaStream_t stream) {
  if (n_rows == 0) return;
  if (cluster_forward(dtype, n_rows, student, student_vocab, student_stride, teacher, teacher_vocab, teacher_stride,
                      labels, options, loss, stats, row_state, grad_weight, grad_student, grad_stride, grad_dtype,
                      stream))
    return;
  dispatch_math(dtype, options.fast_math, dtype, [&](auto tag, auto, auto math) {
    using T = decltype(tag);
    forward_kernel<T, decltype(math)><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
        n_rows, static_cast<const T*>(student), student_vocab, student_stride, static_cast<const T*>(teacher),
        teacher_vocab, teacher_stride, labels, options, loss, stats, row_state,
        grad_student != nullptr ? grad_weight : nullptr);
  });
  check(cudaGetLastError(), "dpkd distill forward kernel");
  if (grad_student != nullptr)
    backward(dtype, n_rows, grad_weight, student, student_vocab, student_stride, teacher, teacher_vocab,
             teacher_stride, labels, row_state, options, grad_student, grad_stride, grad_dtype, stream);
}

void backward(DType dtype, int64_t n_rows, const float* grad_loss, const void* student, int64_t student_vocab,
              int64_t student_stride, const void* teacher, int64_t teacher_vocab, int64_t teacher_stride,
              const int64_t* labels, const float* row_state, const RowOptions& options, void* grad_student,
              int64_t grad_stride, DType grad_dtype, cudaStream_t stream) {
  if (n_rows == 0) return;
  dispatch_math(dtype, options.fast_math, grad_dtype, [&](auto tag, auto grad_tag, auto math) {
    using T = decltype(tag);
    using G = decltype(grad_tag);
    const bool vectorized = !options.standardize && student_vocab == teacher_vocab &&
                            packs_aligned<T>(student, student_stride) && packs_aligned<T>(teacher, teacher_stride) &&
                            values_aligned<G, Pack<T>::kSize>(grad_student, grad_stride);
    backward_kernel<T, G, decltype(math)><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
        n_rows, grad_loss, static_cast<const T*>(student), student_vocab, student_stride,
        static_cast<const T*>(teacher), teacher_vocab, teacher_stride, labels, row_state, options,
        static_cast<G*>(grad_student), grad_stride, vectorized);
  });
  check(cudaGetLastError(), "dpkd distill backward kernel");
}

void scale_unless_one(DType dtype, void* x, int64_t n, const float* scale, cudaStream_t stream) {
  if (n == 0) return;
  dispatch_math(dtype, false, dtype, [&](auto tag, auto, auto) {
    using T = decltype(tag);
    const int64_t blocks = (n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096;
    scale_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<T*>(x), n, scale);
  });
  check(cudaGetLastError(), "dpkd scale kernel");
}

}  // namespace dpkd::distill::cuda
