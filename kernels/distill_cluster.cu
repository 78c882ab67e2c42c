// The forward pass as one Hopper thread-block cluster per row (sm_90): the row is split across the
// cluster's blocks, each block keeps its slice of both models' logits in shared memory (64 KB), and the
// two row reductions (log-sum-exps, then divergence and <q, g>) go through distributed shared memory. Each
// logit is read from memory once, where the one-block-per-row kernel reads it twice; given a gradient
// buffer, the same kernel also writes the gradient, so forward and backward together cost one read of
// both models' logits and one write of the gradient.
//
// Taken when the device is sm_90 or newer, without standardization, with equal vocabularies of at most
// kMaxCluster * 256 * 128 bytes per model and 16-byte aligned rows; distill_kernels.cu handles the rest.
// Given a gradient buffer, rows of zero weight are skipped (loss 0, statistics NaN, gradient 0) unread.
#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include <stdexcept>
#include <string>

#include "distill_cuda.h"
#include "distill_device.cuh"

namespace dpkd::distill::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kClusterThreads = 256;
constexpr int kPacksPerThread = 8;  // 128 bytes of each model's logits per thread, cached in shared memory
constexpr int kMaxCluster = 16;     // a non-portable cluster size, which Hopper allows

// The first pass's row state. For the two KLs it also carries sums weighted like the log-sum-exps' (in
// units of exp(x - s.max) and exp(y - t.max)), which give the loss, <q, g> and the entropies in the same
// pass: the KLs need no second pass. The other objectives carry the teacher's y at the student's peak, where
// g_ref is taken.
struct Pass1 {
  MaxSum s, t, raw;
  float s_x, s_xy;  // sum exp(x - s.max) (x - s.max), sum exp(x - s.max) (x - y)
  float t_y, t_yx;  // sum exp(y - t.max) (y - t.max), sum exp(y - t.max) (y - x)
  float peak_y;     // y where x = s.max (ties: the first operand's, as Peak's merge)
};
__device__ __forceinline__ float rescale(float max, float to) { return max == -INFINITY ? 0.f : expf(max - to); }
// A weighted sum whose weight flushed to 0 is dropped: s_xy is +inf where a finite x meets y = -inf, and its
// entries' q (or p) underflowing to 0 contribute nothing, as on the CPU, not 0 * inf = NaN. The exp-sums, which
// carry a real NaN, are rescaled plainly.
__device__ __forceinline__ float rescaled(float sum, float factor) { return factor > 0.f ? sum * factor : 0.f; }
// sum e (x - max) -> sum e' (x - to) with e' = e factor: the entropies' sums stay against the running max (sum e x
// at logits near 1e4 would carry ulp(1e4) into every term).
__device__ __forceinline__ float recentred(float centred, float sum, float max, float to, float factor) {
  return factor > 0.f ? (centred + (max - to) * sum) * factor : 0.f;
}
__device__ __forceinline__ Pass1 merge(const Pass1& a, const Pass1& b) {
  const float ms = fmaxf(a.s.max, b.s.max), mt = fmaxf(a.t.max, b.t.max);
  const float as = rescale(a.s.max, ms), bs = rescale(b.s.max, ms), at = rescale(a.t.max, mt),
              bt = rescale(b.t.max, mt);
  return {{ms, a.s.sum * as + b.s.sum * bs},
          {mt, a.t.sum * at + b.t.sum * bt},
          merge(a.raw, b.raw),
          recentred(a.s_x, a.s.sum, a.s.max, ms, as) + recentred(b.s_x, b.s.sum, b.s.max, ms, bs),
          rescaled(a.s_xy, as) + rescaled(b.s_xy, bs),
          recentred(a.t_y, a.t.sum, a.t.max, mt, at) + recentred(b.t_y, b.t.sum, b.t.max, mt, bt),
          rescaled(a.t_yx, at) + rescaled(b.t_yx, bt),
          b.s.max > a.s.max ? b.peak_y : a.peak_y};
}
// NaN or +inf in a row: its exp-sum is NaN (exp(NaN - m), or exp(inf - inf) at the +inf maximum).
__device__ __forceinline__ bool bad(const MaxSum& m) { return isnan(m.sum) || m.max == INFINITY; }

struct MergePass1 {
  __device__ __forceinline__ Pass1 operator()(const Pass1& a, const Pass1& b) const { return merge(a, b); }
};

// Divergence D and the form F of its terms (distill_device.cuh) are template parameters: the per-element loops
// then hold one objective's code, not a six-way switch or a branch per element.
// G: the gradient's element type (dispatch_math).
template <class T, class G, Divergence D, class Math, Form F>
__global__ void __launch_bounds__(kClusterThreads)
    cluster_kernel(const T* student, int64_t s_stride, const T* teacher, int64_t t_stride, int64_t v,
                   const int64_t* labels, RowOptions o, bool raw_needed, float* loss, float* stats, float* state,
                   const float* grad_weight, G* grad, int64_t g_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int P = Pack<T>::kSize, K = kPacksPerThread;
  using Reduce1 = cub::BlockReduce<Pass1, kClusterThreads>;
  using Reduce2 = cub::BlockReduce<Sum4, kClusterThreads>;
  __shared__ union {
    typename Reduce1::TempStorage r1;
    typename Reduce2::TempStorage r2;
  } temp;
  __shared__ Pass1 block1, row1;  // this block's partial (read by the whole cluster), and the row's
  __shared__ Sum4 block2, row2;
  // The block's slice of both rows, raw, -inf past the vocabulary: read from memory once, then reused.
  extern __shared__ __align__(16) unsigned char cache_bytes[];
  Pack<T>* s_cache = reinterpret_cast<Pack<T>*>(cache_bytes);
  Pack<T>* t_cache = s_cache + K * kClusterThreads;

  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  const int64_t i = blockIdx.x / size;
  const T* s_row = student + i * s_stride;
  const T* t_row = teacher + i * t_stride;
  const int64_t base = static_cast<int64_t>(rank) * kClusterThreads * K * P;
  auto index = [&](int k) { return base + (static_cast<int64_t>(k) * kClusterThreads + threadIdx.x) * P; };
  const float scale = 1.f / o.temperature, mix = o.teacher_mix;

  auto write_zero_gradient = [&] {  // this block's slice of the row
    G* out = grad + i * g_stride;
    for (int64_t j = base + threadIdx.x; j < v && j < base + static_cast<int64_t>(kClusterThreads) * K * P;
         j += kClusterThreads)
      out[j] = from_float<G>(0.f);
  };
  if (grad != nullptr && grad_weight[i] == 0.f) {  // the whole cluster takes this branch: no cluster.sync below
    if (rank == 0 && threadIdx.x == 0) write_skipped_row(i, loss, stats, state);
    write_zero_gradient();
    return;
  }

  // Load, and the thread's maxima on the way.
  constexpr bool kl = D == Divergence::kForwardKL || D == Divergence::kReverseKL;
  float max_x = -INFINITY, max_y = -INFINITY, max_raw = -INFINITY, peak_y = -INFINITY;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j0 = index(k);
    Pack<T> ps, pt;
    if (j0 + P <= v) {
      ps = *reinterpret_cast<const Pack<T>*>(s_row + j0);
      pt = *reinterpret_cast<const Pack<T>*>(t_row + j0);
    } else {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        ps.v[e] = j0 + e < v ? s_row[j0 + e] : from_float<T>(-INFINITY);
        pt.v[e] = j0 + e < v ? t_row[j0 + e] : from_float<T>(-INFINITY);
      }
    }
    s_cache[k * kClusterThreads + threadIdx.x] = ps;
    t_cache[k * kClusterThreads + threadIdx.x] = pt;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const float zs = to_float(ps.v[e]), zt = mix_teacher(mix, to_float(pt.v[e]), zs);
      if (!kl && zs * scale > max_x) peak_y = zt * scale;
      max_x = fmaxf(max_x, zs * scale);
      max_y = fmaxf(max_y, zt * scale);
      max_raw = fmaxf(max_raw, zs);
    }
  }
  // Two-pass objectives: the second pass replaces each cached teacher logit with the entry's g - g_ref, which
  // the gradient then reads instead of recomputing the objective's terms (one exp per entry instead of the
  // objective's exps and logs: the bf16 JSD's gradient pass 39.5 -> 26.9 SASS instructions per entry). Exact
  // in an fp32 slot; a 16-bit slot keeps it as bf16 (keep_in_slot), 3 digits, which adds about as much error
  // as rounding the gradient itself to bf16: float64 emulation of the JSD gradient on bf16 logits (V 32000,
  // beta 0.1 / 0.5 / 0.9, scales 1 to 30, student within 1e-5 of the teacher, peaked rows) gave relative norm
  // errors of 0.5e-3 to 2.4e-3 from the output rounding alone and 0.5e-3 to 4.5e-3 with g - g_ref in bf16
  // (worst row 5.6e-3; the goal for bf16 is 2e-2). g - g_ref in fp16 instead: worst row 1.2, from its range.
  constexpr bool kKeepG = !kl;
  // f(zs, zt) for each cached entry; with keep true, f's result replaces the entry's teacher logit in the
  // cache. Each thread reads back only what it wrote: no barrier needed before these loops.
  auto for_each = [&](auto&& f, auto keep) {
    for (int k = 0; k < K; ++k) {
      const Pack<T> ps = s_cache[k * kClusterThreads + threadIdx.x];
      Pack<T> pt = t_cache[k * kClusterThreads + threadIdx.x];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float zs = to_float(ps.v[e]), zt = mix_teacher(mix, to_float(pt.v[e]), zs);
        if constexpr (decltype(keep)::value) {
          pt.v[e] = keep_in_slot<T>(f(zs, zt));
        } else {
          f(zs, zt);
        }
      }
      if constexpr (decltype(keep)::value) t_cache[k * kClusterThreads + threadIdx.x] = pt;
    }
  };

  // Pass 1: the log-sum-exps (and the raw student's, for the hard-label term). A thread whose entries are all
  // -inf (past the vocabulary's end) has max -inf: its exps are taken against 0 instead, exp(-inf) = 0, so
  // the sums stay 0 without a branch per entry (a NaN entry still makes its sum NaN: the row is flagged).
  auto shift = [](float max) { return max == -INFINITY ? 0.f : max; };
  const float shift_x = shift(max_x), shift_y = shift(max_y), shift_raw = shift(max_raw);
  Pass1 p1{{max_x, 0.f}, {max_y, 0.f}, {raw_needed ? max_raw : -INFINITY, 0.f}, 0.f, 0.f, 0.f, 0.f, peak_y};
  for_each([&](float zs, float zt) {
    const float x = zs * scale, y = zt * scale;
    const float dx = x - shift_x, dy = y - shift_y, ex = Math::exp(dx), ey = Math::exp(dy);
    p1.s.sum += ex;
    p1.t.sum += ey;
    if constexpr (kl) {  // entries of probability 0 add nothing (0 * inf would be NaN), as q > 0 and p > 0 select
      p1.s_x += ex > 0.f ? ex * dx : 0.f;
      p1.s_xy += ex > 0.f ? ex * (x - y) : 0.f;
      p1.t_y += ey > 0.f ? ey * dy : 0.f;
      p1.t_yx += ey > 0.f ? ey * (y - x) : 0.f;
    }
    if (raw_needed) p1.raw.sum += Math::exp(zs - shift_raw);
  }, std::false_type{});
  p1 = Reduce1(temp.r1).Reduce(p1, MergePass1());
  if (threadIdx.x == 0) block1 = p1;
  cluster.sync();
  if (threadIdx.x == 0) {
    Pass1 r = *cluster.map_shared_rank(&block1, 0);
    for (unsigned b = 1; b < size; ++b) r = merge(r, *cluster.map_shared_rank(&block1, b));
    row1 = r;
  }
  __syncthreads();
  const Pass1 r1 = row1;
  const float log_sum_s = logf(r1.s.sum), log_sum_t = logf(r1.t.sum);
  RowContext ctx(D, o.objective, r1.s.max, log_sum_s, r1.t.max, log_sum_t);
  if constexpr (!kl) ctx.g_ref = g_at<Math, F>(ctx, Peak{r1.s.max, r1.peak_y});

  // (divergence, <q, g - g_ref>, sum q (x - max_s), sum p (y - max_t)): for the KLs from the first pass (reverse KL: g = x - y), else
  // from a second pass.
  Sum4 total;
  if constexpr (kl) {
    cluster.sync();  // the cluster's shared-memory reads are done before any block moves on or exits
    const float s_mean = r1.s.sum > 0.f ? 1.f / r1.s.sum : 0.f, t_mean = r1.t.sum > 0.f ? 1.f / r1.t.sum : 0.f;
    const float sum_qd = r1.s_xy * s_mean;
    total = {D == Divergence::kForwardKL ? r1.t_yx * t_mean + ctx.c : sum_qd - ctx.c,
             D == Divergence::kReverseKL ? sum_qd : 0.f, r1.s_x * s_mean, r1.t_y * t_mean};
  } else {
    Sum4 part{0.f, 0.f, 0.f, 0.f};
    for_each([&](float zs, float zt) { return accumulate_terms<Math, F>(part, ctx, zs * scale, zt * scale); },
             std::bool_constant<kKeepG>{});
    part = Reduce2(temp.r2).Reduce(part, AddSum4());
    if (threadIdx.x == 0) block2 = part;
    cluster.sync();
    if (threadIdx.x == 0) {
      // Every block merges in rank order, so all see the same <q, g>.
      Sum4 r = *cluster.map_shared_rank(&block2, 0);
      for (unsigned b = 1; b < size; ++b) r = r + *cluster.map_shared_rank(&block2, b);
      row2 = r;
    }
    cluster.sync();  // the cluster's shared-memory reads are done before any block moves on or exits
    total = row2;
  }
  ctx.qg = total.b;
  const bool has_label = labels != nullptr && labels[i] != o.ignore_index;
  const int64_t label = has_label ? labels[i] : -1;
  const float raw_max = raw_needed ? r1.raw.max : r1.s.max;
  const float raw_log_sum = raw_needed ? logf(r1.raw.sum) : log_sum_s;
  if (rank == 0 && threadIdx.x == 0) {
    RowSummary r{ctx, total, bad(r1.s), bad(r1.t), 0.f, scale, 0.f, scale, 0.f, static_cast<float>(v),
                 raw_max, raw_log_sum};
    if (has_label) {
      r.student_label_logit = to_float(s_row[label]);
      r.teacher_label_logit = mix_teacher(mix, to_float(t_row[label]), r.student_label_logit);
    }
    write_row(r, i, labels != nullptr, has_label, o, loss, stats, state);
  }
  if (grad == nullptr) return;

  // The gradient of grad_weight[i] * loss[i], from the cache.
  if (labels != nullptr && !has_label) {
    write_zero_gradient();
    return;
  }
  const float gl = grad_weight[i];
  const float w = has_label ? o.hard_label_weight : 0.f;
  const float a = (1.f - w) * gl, b = w * gl;
  G* out = grad + i * g_stride;
  // One loop for rows with the hard-label term and one without, so that no entry branches on it.
  auto gradient_pass = [&](auto hard_label) {
    for (int k = 0; k < K; ++k) {
      const int64_t j0 = index(k);
      const Pack<T> ps = s_cache[k * kClusterThreads + threadIdx.x], pt = t_cache[k * kClusterThreads + threadIdx.x];
      float gz[P];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float zs = to_float(ps.v[e]);
        auto dx = [&] {
          if constexpr (kKeepG) {
            return divergence_grad_from_g<Math, D>(ctx, zs * scale, kept_in_slot(pt.v[e]));
          } else {
            return divergence_grad<Math, F>(ctx, zs * scale, mix_teacher(mix, to_float(pt.v[e]), zs) * scale);
          }
        };
        gz[e] = raw_grad<Math, decltype(hard_label)::value>(zs, dx, a, b, scale, raw_max, raw_log_sum, j0 + e == label);
      }
      if (j0 + P <= v) {
        store_values<G>(out + j0, gz);
      } else {
#pragma unroll
        for (int e = 0; e < P; ++e)
          if (j0 + e < v) out[j0 + e] = from_float<G>(gz[e]);
      }
    }
  };
  if (b != 0.f) {
    gradient_pass(std::true_type{});
  } else {
    gradient_pass(std::false_type{});
  }
#else
  __trap();  // the host launches this kernel only where it was compiled for sm_90 or newer (cluster_forward)
#endif
}

}  // namespace

bool cluster_forward(DType dtype, int64_t n_rows, const void* student, int64_t student_vocab, int64_t student_stride,
                     const void* teacher, int64_t teacher_vocab, int64_t teacher_stride, const int64_t* labels,
                     const RowOptions& options, float* loss, float* stats, float* row_state, const float* grad_weight,
                     void* grad, int64_t grad_stride, DType grad_dtype, cudaStream_t stream) {
  if (options.standardize || student_vocab != teacher_vocab) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9)
    return false;
  bool launched = false;
  auto launch = [&](auto tag, auto grad_tag, auto math) {
    using T = decltype(tag);
    using G = decltype(grad_tag);
    using M = decltype(math);
    constexpr int P = Pack<T>::kSize;
    const int64_t per_block = static_cast<int64_t>(kClusterThreads) * kPacksPerThread * P;
    const int64_t size = (student_vocab + per_block - 1) / per_block;
    if (size < 1 || size > kMaxCluster || n_rows * size > INT32_MAX) return;
    if (!packs_aligned<T>(student, student_stride) || !packs_aligned<T>(teacher, teacher_stride)) return;
    if (grad != nullptr && !values_aligned<G, P>(grad, grad_stride)) return;
    const Divergence d = effective_divergence(options.objective);
    constexpr Form kGeneric = Form::kGeneric;
    auto jsd = cluster_kernel<T, G, Divergence::kJSD, M, kGeneric>;
    if constexpr (std::is_same_v<M, FastMath>) {
      if (jsd_log_form(d, options.objective, true)) jsd = cluster_kernel<T, G, Divergence::kJSD, M, Form::kJsdLog>;
    }
    auto kernel = d == Divergence::kForwardKL       ? cluster_kernel<T, G, Divergence::kForwardKL, M, kGeneric>
                  : d == Divergence::kReverseKL     ? cluster_kernel<T, G, Divergence::kReverseKL, M, kGeneric>
                  : d == Divergence::kJSD           ? jsd
                  : d == Divergence::kSkewKL        ? cluster_kernel<T, G, Divergence::kSkewKL, M, kGeneric>
                  : d == Divergence::kSkewReverseKL ? cluster_kernel<T, G, Divergence::kSkewReverseKL, M, kGeneric>
                                                    : cluster_kernel<T, G, Divergence::kTVD, M, kGeneric>;
    const int smem = 2 * kPacksPerThread * kClusterThreads * 16;
    // The kernel's body exists only in code compiled for sm_90 or later: a build for an older architecture
    // (e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX") runs on a Hopper GPU from JIT-compiled compute_80 PTX, where the
    // body is a trap; such builds take the one-block kernels.
    cudaFuncAttributes compiled{};
    if (cudaFuncGetAttributes(&compiled, kernel) != cudaSuccess || compiled.ptxVersion < 90) {
      (void)cudaGetLastError();
      return;
    }
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        (size > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
      (void)cudaGetLastError();
      return;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(n_rows * size));
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(size);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    // A GPU (or a partition of one: MPS, green contexts) that cannot hold one such cluster takes the one-block kernels.
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
      (void)cudaGetLastError();
      return;
    }
    const bool raw_needed = labels != nullptr && options.hard_label_weight > 0.f && options.temperature != 1.f;
    const cudaError_t err =
        cudaLaunchKernelEx(&config, kernel, static_cast<const T*>(student), student_stride,
                           static_cast<const T*>(teacher), teacher_stride, student_vocab, labels, options, raw_needed,
                           loss, stats, row_state, grad_weight, static_cast<G*>(grad), grad_stride);
    if (err != cudaSuccess) throw std::runtime_error(std::string("dpkd cluster forward kernel: ") + cudaGetErrorString(err));
    launched = true;
  };
  dispatch_math(dtype, options.fast_math, grad_dtype, launch);
  return launched;
}

}  // namespace dpkd::distill::cuda
