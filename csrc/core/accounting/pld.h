// Privacy loss distributions (PLDs) of one Poisson-subsampled Gaussian step, discretised by
// connect-the-dots (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect the Dots: Tighter
// Discrete Approximations of Privacy Loss Distributions"): masses on a grid of losses whose hockey-stick
// curve delta(eps) equals the mechanism's at the grid points and lies above it between them, so any
// composition of them bounds the true one from above. Composition (FFT) lives in Python (dpkd.pld).
#pragma once

#include <cstdint>
#include <vector>

namespace dpkd::accounting {

// Add/remove adjacency: kRemove compares P = M(D with the example) against Q = M(D without it),
// kAdd the reverse. The loss L = log(P(x)/Q(x)) for x ~ P; both directions are composed, and the
// larger epsilon counts.
enum class Adjacency { kRemove, kAdd };

// delta(eps) = E_P[(1 - exp(eps - L))_+] of ONE step with sensitivity 1, in closed form through the
// normal CDF (log space: accurate where delta is 1e-300).
double gaussian_hockey_stick(double noise_multiplier, double sample_rate, double epsilon, Adjacency adjacency);

// masses[i] sits at loss (lower + i) * interval; infinity_mass at +inf.
struct DiscretePLD {
  int64_t lower = 0;
  std::vector<double> masses;
  double infinity_mass = 0.0;
};

// One step's connect-the-dots PLD on the multiples of `interval` that span the losses of all but
// `tail_mass` of P (the rest is accounted pessimistically: delta at the grid's ends is exact). Throws
// std::invalid_argument naming the argument for a bad sigma, q, interval or tail mass, or a grid of
// more than 2^27 points.
DiscretePLD subsampled_gaussian_pld(double noise_multiplier, double sample_rate, double interval, double tail_mass,
                                    Adjacency adjacency);

}  // namespace dpkd::accounting
