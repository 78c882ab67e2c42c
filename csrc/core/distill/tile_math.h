// Tiles of floats for the CPU kernels (objectives.cpp, topk.cpp): a row is streamed in fixed-size tiles that stay in
// L1 (a short last tile is padded with -inf, which every formula masks), and Eigen vectorises the shared row math
// (row_math.h) over a tile.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>

#include "distill/objectives.h"

namespace dpkd::distill::tiles {

constexpr int64_t kTile = 256;
using Tile = Eigen::Array<float, kTile, 1>;

// Blend two tiles by a condition, as a plain loop: GCC if-converts it into vector blends, where
// Eigen 3.4's select() is evaluated coefficient by coefficient.
template <class Cond>
inline Tile blend(const Cond& cond, const Tile& a, const Tile& b) {
  Tile out;
  for (int64_t k = 0; k < kTile; ++k) out[k] = cond.coeff(k) ? a[k] : b[k];
  return out;
}

// The row-math policy over whole tiles (see ScalarMath in row_math.h).
struct TileMath {
  static Tile exp(const Tile& x) { return x.exp(); }
  static Tile log1p(const Tile& x) { return x.log1p(); }
  static Tile max(const Tile& a, const Tile& b) { return a.max(b); }
  static Tile min(const Tile& a, const Tile& b) { return a.min(b); }
  static Tile abs(const Tile& x) { return x.abs(); }
  static Tile sign(const Tile& x) { return x.sign(); }
  template <class C>
  static Tile select(const C& c, const Tile& a, const Tile& b) { return blend(c, a, b); }
};

inline float load(float v) { return v; }
inline float load(BFloat16 v) { return bf16_to_float(v.bits); }
inline float load(Float16 v) { return half_to_float(v.bits); }
template <class T> T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline BFloat16 store<BFloat16>(float f) { return {float_to_bf16(f)}; }
template <> inline Float16 store<Float16>(float f) { return {float_to_half(f)}; }

// exp((x - max) - log_sum), exactly 0 where x = -inf. Eigen's vectorised exp clamps its argument near
// -88, so exp(-inf) would come out as ~1e-38 and a padded column would get a probability. The two
// shifts stay apart: max + log_sum rounded to float would cost ulp(max) (1e-3 at logits of 1e4).
inline Tile probabilities(const Tile& x, float max, float log_sum) {
  const Tile e = ((x - max) - log_sum).exp();
  Tile out;
  for (int64_t k = 0; k < kTile; ++k) out[k] = x[k] > -INFINITY ? e[k] : 0.f;
  return out;
}

// weight * value, 0 where the weight is 0 (so 0 * inf contributes nothing).
inline Tile masked(const Tile& weight, const Tile& value) {
  Tile out;
  for (int64_t k = 0; k < kTile; ++k) out[k] = weight[k] > 0.f ? weight[k] * value[k] : 0.f;
  return out;
}

// Online softmax statistics over tiles: the log-sum-exp (the running max is a data value, the sum is
// kept in double), on request sum_j softmax(x)_j (x_j - max) for the entropy, and the softmax-weighted sum
// of a value tile, rescaled whenever the max grows. The KL objectives need nothing more, so they take a
// single pass over the row. The entropy's sum is taken against the max: sum q x at logits near 1e4 would
// carry float's ulp(1e4) into every term (1.5e-3 of absolute error in an entropy of 3).
struct OnlineSoftmax {
  float max = -INFINITY;
  double sum = 0.0, centered = 0.0, weighted = 0.0;
  // e_out, if given, receives the tile's exp(x - max) (max: the running max after this tile).
  void add(const Tile& x, bool entropy = false, const Tile* v = nullptr, float* e_out = nullptr) {
    const float m = x.maxCoeff();
    if (!(m > -INFINITY)) {
      if (e_out) Eigen::Map<Tile>{e_out}.setZero();
      return;
    }
    if (m > max) {
      if (sum > 0.0) {  // sum e (x - max) -> sum e' (x - m) with e' = e exp(max - m)
        const double rescale = std::exp(static_cast<double>(max) - m);
        centered = (centered + (static_cast<double>(max) - m) * sum) * rescale;
        sum *= rescale;
        weighted *= rescale;
      }
      max = m;
    }
    const Tile e = probabilities(x, max, 0.f);
    if (e_out) Eigen::Map<Tile>{e_out} = e;
    sum += static_cast<double>(e.sum());
    if (entropy) centered += static_cast<double>(masked(e, Tile(x - max)).sum());
    if (v) weighted += static_cast<double>(masked(e, *v).sum());
  }
  float log_sum() const { return static_cast<float>(std::log(sum)); }
  double entropy() const { return std::log(sum) - centered / sum; }  // log sum e - sum q (x - max)
  double mean() const { return weighted / sum; }  // sum_j softmax(x)_j v_j
};

}  // namespace dpkd::distill::tiles
