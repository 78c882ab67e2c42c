// Per-row top-fraction selection on CUDA as one device-wide stable radix sort (CUB) of 64-bit keys: the row
// index in the high bits, the score's order-preserving bits (descending) in the low 32, the column as the
// value. Rows come out one after another, each sorted best first with ties in column order, and invalid
// entries (keyed as -inf) last. Then each row's count of valid entries is read off its sorted keys and the
// first selected_count positions are marked. Every step is parallel over all entries (or rows), so one long
// row (the batch scope) is sorted as fast as many short ones, and nothing synchronises with the host.
#include <cub/device/device_radix_sort.cuh>

#include <stdexcept>
#include <string>

#include "select/top_fraction.h"
#include "select_cuda.h"

namespace dpkd::select::cuda {
namespace {

constexpr int kThreads = 256;

// The scratch arrays inside one workspace allocation, each 256-byte aligned.
struct Workspace {
  uint64_t* keys_in;
  uint64_t* keys_out;
  int32_t* cols_in;
  int32_t* cols_out;
  int64_t* count;  // per row: how many to select
  void* sort_temp;
  size_t sort_bytes;
};

size_t align(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Bits the sort must look at: the 32 of the score and enough for the row index.
int end_bit(int64_t rows) {
  int bits = 0;
  while (bits < 32 && (int64_t{1} << bits) < rows) ++bits;
  return 32 + bits;
}

size_t sort_temp_bytes(int64_t rows, int64_t n) {
  size_t bytes = 0;
  const cudaError_t err = cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, 0, end_bit(rows));
  if (err != cudaSuccess) throw std::runtime_error(std::string("dpkd select: sort size query: ") + cudaGetErrorString(err));
  return bytes;
}

size_t arrays_bytes(int64_t rows, int64_t n) {
  return 2 * align(n * sizeof(uint64_t)) + 2 * align(n * sizeof(int32_t)) + align(rows * sizeof(int64_t));
}

Workspace carve(void* base, int64_t rows, int64_t n, size_t sort_bytes) {
  auto* p = static_cast<unsigned char*>(base);
  Workspace w;
  w.keys_in = reinterpret_cast<uint64_t*>(p), p += align(n * sizeof(uint64_t));
  w.keys_out = reinterpret_cast<uint64_t*>(p), p += align(n * sizeof(uint64_t));
  w.cols_in = reinterpret_cast<int32_t*>(p), p += align(n * sizeof(int32_t));
  w.cols_out = reinterpret_cast<int32_t*>(p), p += align(n * sizeof(int32_t));
  w.count = reinterpret_cast<int64_t*>(p), p += align(rows * sizeof(int64_t));
  w.sort_temp = p;
  w.sort_bytes = sort_bytes;
  return w;
}

// Low 32 key bits of a score: ascending in the sort = descending in the score. -0 is keyed as +0 (a
// comparison sort, the CPU op, calls them a tie).
__host__ __device__ inline uint32_t descending_bits(float f) {
  if (f == 0.f) f = 0.f;
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

__global__ void make_keys(const float* score, const bool* valid, int64_t n, int64_t cols, bool largest, Workspace w) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float s = score[p];
    const float key = valid[p] && isfinite(s) ? (largest ? s : -s) : -INFINITY;
    const int64_t row = p / cols;
    w.keys_in[p] = static_cast<uint64_t>(row) << 32 | descending_bits(key);
    w.cols_in[p] = static_cast<int32_t>(p - row * cols);
  }
}

// Valid keys are finite and sort before the -inf ones: a row's valid count is the position of its first -inf.
__global__ void count_selected(int64_t rows, int64_t cols, double fraction, Workspace w) {
  const uint32_t invalid = descending_bits(-INFINITY);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint64_t* keys = w.keys_out + i * cols;
    int64_t lo = 0, hi = cols;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<uint32_t>(keys[mid]) == invalid) hi = mid; else lo = mid + 1;
    }
    w.count[i] = selected_count(fraction, lo);
  }
}

// Each row's sorted columns are a permutation of its columns: every output entry is written once.
__global__ void mark(int64_t n, int64_t cols, bool* selected, Workspace w) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = p / cols;
    selected[i * cols + w.cols_out[p]] = p - i * cols < w.count[i];
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("dpkd select: ") + what + ": " + cudaGetErrorString(err));
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

}  // namespace

size_t top_fraction_workspace_bytes(int64_t rows, int64_t cols) {
  return arrays_bytes(rows, rows * cols) + sort_temp_bytes(rows, rows * cols);
}

void top_fraction(const float* score, const bool* valid, int64_t rows, int64_t cols, double fraction, bool largest,
                  bool* selected, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t n = rows * cols;
  const size_t sort_bytes = sort_temp_bytes(rows, n);
  if (workspace_bytes < arrays_bytes(rows, n) + sort_bytes)
    throw std::invalid_argument("dpkd select: workspace smaller than top_fraction_workspace_bytes");
  Workspace w = carve(workspace, rows, n, sort_bytes);
  make_keys<<<blocks_for(n), kThreads, 0, stream>>>(score, valid, n, cols, largest, w);
  check(cudaGetLastError(), "make_keys");
  check(cub::DeviceRadixSort::SortPairs(w.sort_temp, w.sort_bytes, static_cast<const uint64_t*>(w.keys_in),
                                        w.keys_out, static_cast<const int32_t*>(w.cols_in), w.cols_out, n, 0,
                                        end_bit(rows), stream),
        "radix sort");
  count_selected<<<blocks_for(rows), kThreads, 0, stream>>>(rows, cols, fraction, w);
  check(cudaGetLastError(), "count_selected");
  mark<<<blocks_for(n), kThreads, 0, stream>>>(n, cols, selected, w);
  check(cudaGetLastError(), "mark");
}

}  // namespace dpkd::select::cuda
