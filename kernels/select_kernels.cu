// Per-row top-fraction selection on CUDA: keys (invalid entries -inf, so they sort last), one segmented
// stable sort of all rows (CUB), then each row's count of valid entries read off its sorted keys and the
// first selected_count positions marked. Every kernel is elementwise over the whole [rows, cols] block or
// over rows, so one long row (the batch scope) is as parallel as many short ones.
#include <cub/device/device_segmented_sort.cuh>

#include <stdexcept>
#include <string>

#include "select/top_fraction.h"
#include "select_cuda.h"

namespace dpkd::select::cuda {
namespace {

constexpr int kThreads = 256;

// The scratch arrays inside one workspace allocation, each 256-byte aligned.
struct Workspace {
  float* keys_in;
  float* keys_out;
  int32_t* cols_in;
  int32_t* cols_out;
  int64_t* offsets;  // rows + 1
  int64_t* count;    // per row: how many to select
  void* sort_temp;
  size_t sort_bytes;
};

size_t align(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t sort_temp_bytes(int64_t rows, int64_t n) {
  size_t bytes = 0;
  const cudaError_t err = cub::DeviceSegmentedSort::StableSortPairsDescending(
      nullptr, bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, rows,
      static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr));
  if (err != cudaSuccess) throw std::runtime_error(std::string("dpkd select: sort size query: ") + cudaGetErrorString(err));
  return bytes;
}

Workspace carve(void* base, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  auto* p = static_cast<unsigned char*>(base);
  Workspace w;
  w.keys_in = reinterpret_cast<float*>(p), p += align(n * sizeof(float));
  w.keys_out = reinterpret_cast<float*>(p), p += align(n * sizeof(float));
  w.cols_in = reinterpret_cast<int32_t*>(p), p += align(n * sizeof(int32_t));
  w.cols_out = reinterpret_cast<int32_t*>(p), p += align(n * sizeof(int32_t));
  w.offsets = reinterpret_cast<int64_t*>(p), p += align((rows + 1) * sizeof(int64_t));
  w.count = reinterpret_cast<int64_t*>(p), p += align(rows * sizeof(int64_t));
  w.sort_temp = p;
  w.sort_bytes = sort_temp_bytes(rows, n);
  return w;
}

// Sort keys: the score (negated for the lowest), -inf where not valid or not finite. -0 becomes +0: the radix
// sort orders -0 before +0, which a comparison sort (the CPU op) treats as a tie.
__global__ void make_keys(const float* score, const bool* valid, int64_t rows, int64_t cols, bool largest, Workspace w) {
  const int64_t n = rows * cols;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; p < n || p <= rows;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (p <= rows) w.offsets[p] = p * cols;
    if (p >= n) continue;
    const float s = score[p];
    const float key = largest ? s : -s;
    w.keys_in[p] = valid[p] && isfinite(s) ? (key == 0.f ? 0.f : key) : -INFINITY;
    w.cols_in[p] = static_cast<int32_t>(p % cols);
  }
}

// Valid keys are finite and sort before the -inf ones: a row's valid count is the position of its first -inf.
__global__ void count_selected(int64_t rows, int64_t cols, double fraction, Workspace w) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float* keys = w.keys_out + i * cols;
    int64_t lo = 0, hi = cols;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] == -INFINITY) hi = mid; else lo = mid + 1;
    }
    w.count[i] = selected_count(fraction, lo);
  }
}

// Each row's sorted columns are a permutation of its columns: every output entry is written once.
__global__ void mark(int64_t rows, int64_t cols, bool* selected, Workspace w) {
  const int64_t n = rows * cols;
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
  const int64_t n = rows * cols;
  return 2 * align(n * sizeof(float)) + 2 * align(n * sizeof(int32_t)) + align((rows + 1) * sizeof(int64_t)) +
         align(rows * sizeof(int64_t)) + sort_temp_bytes(rows, n);
}

void top_fraction(const float* score, const bool* valid, int64_t rows, int64_t cols, double fraction, bool largest,
                  bool* selected, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (workspace_bytes < top_fraction_workspace_bytes(rows, cols))
    throw std::invalid_argument("dpkd select: workspace smaller than top_fraction_workspace_bytes");
  Workspace w = carve(workspace, rows, cols);
  const int64_t n = rows * cols;
  make_keys<<<blocks_for(n > rows + 1 ? n : rows + 1), kThreads, 0, stream>>>(score, valid, rows, cols, largest, w);
  check(cudaGetLastError(), "make_keys");
  check(cub::DeviceSegmentedSort::StableSortPairsDescending(w.sort_temp, w.sort_bytes, w.keys_in, w.keys_out,
                                                            w.cols_in, w.cols_out, n, rows, w.offsets, w.offsets + 1,
                                                            stream),
        "segmented sort");
  count_selected<<<blocks_for(rows), kThreads, 0, stream>>>(rows, cols, fraction, w);
  check(cudaGetLastError(), "count_selected");
  mark<<<blocks_for(n), kThreads, 0, stream>>>(rows, cols, selected, w);
  check(cudaGetLastError(), "mark");
}

}  // namespace dpkd::select::cuda
