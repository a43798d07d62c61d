// Top-K token selection on CUDA (DESIGN.md 1.6), plain and fused with the Scorer's tail.
//
// select_topk (one launch; a few blocks per image, each of which selects the whole image and copies
// its share of the kept rows):
//   1. the image's scores become 32-bit order keys in shared memory (select.h);
//   2. radix select of the K-th largest 64-bit key (score, then lower index: unique per image),
//      up to eight passes of 8 bits: a shared histogram of the candidates, then one warp scans it;
//      the passes stop once the chosen digit's bin is kept whole;
//   3. the kept positions (key >= threshold) are compacted in index order with a block scan, so
//      they come out ascending with no sort;
//   4. the block's warps copy its kept rows (16-byte vectors when the width allows).
//   Step 1 also clears the launch's `finite` flag (set to true on the stream before the launch) when a
//   score is NaN or inf: the Python op asserts it on the device, with no second pass over the scores.
// score_select (one launch after the first layer's GEMM):
//   blocks of (image, chunk of tokens) score their tokens (a warp per token: the token's mean and
//   variance over D, then the folded LayerNorm, GELU and the H -> 1 projection, select.h); the last
//   block of an image to finish (a per-image arrival counter) runs steps 1-4 on the image's
//   scores (and clears `finite` as above). The counters are per launch: a zeroed int buffer of one
//   counter per image, taken from torch's caching allocator on the launch's stream (stream-ordered, so
//   no launch can see another launch's counters, whatever the streams, and CUDA-graph capture records
//   the zeroing too).
#include "select.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

namespace autoselect {
namespace {

constexpr int kWarpSize = 32;
constexpr int kSelectThreads = 512;       // threads of a block that selects one image
constexpr int kTokensPerScoreBlock = kSelectThreads / 32;  // tokens scored by one block: a warp each
constexpr int kRadixBins = 256;

// Where image b starts and what it keeps. Regular batches need no table (b * N, b * K).
struct SegmentTable {
  const int64_t* table;  // 4 entries per image: token start, kept start, length, k; or nullptr
  int64_t length, k;     // the regular batch's N and K
  __device__ __forceinline__ void get(int64_t b, int64_t& token_start, int64_t& kept_start, int64_t& n,
                                      int64_t& kk) const {
    if (table == nullptr) {
      token_start = b * length, kept_start = b * k, n = length, kk = k;
    } else {
      token_start = table[4 * b], kept_start = table[4 * b + 1], n = table[4 * b + 2], kk = table[4 * b + 3];
    }
  }
};

__device__ __forceinline__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ uint64_t key_at(const uint32_t* order, int64_t i) {
  return (static_cast<uint64_t>(order[i]) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
}

// Step 2: the k-th largest of the image's n keys in shared `order`, so that exactly k keys are >= the
// returned threshold. The passes stop early once the chosen digit's bin holds exactly the keys still to
// be ranked: all of them are kept, and the prefix with zero low bits is a threshold. Distinct scores
// end after two to four of the eight passes; only ties in the score reach the index's bits. All threads
// of the block must call it.
__device__ uint64_t kth_largest_key(const uint32_t* order, int64_t n, int64_t k) {
  __shared__ int histogram[kRadixBins];
  __shared__ uint64_t shared_prefix;
  __shared__ int64_t shared_rank;
  __shared__ bool shared_done;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  uint64_t prefix = 0, mask = 0;
  int64_t rank = k;  // the threshold is the rank-th largest key among those matching prefix
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int bin = tid; bin < kRadixBins; bin += blockDim.x) histogram[bin] = 0;
    __syncthreads();
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const uint64_t key = key_at(order, i);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFF], 1);
    }
    __syncthreads();
    if (warp == 0) {  // lane l owns digits 255 - 8l ... 248 - 8l (descending)
      int counts[8], lane_total = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) lane_total += (counts[j] = histogram[255 - 8 * lane - j]);
      int inclusive = lane_total;
#pragma unroll
      for (int delta = 1; delta < kWarpSize; delta *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, delta);
        if (lane >= delta) inclusive += other;
      }
      int64_t before = inclusive - lane_total;  // candidates with a larger digit than this lane's
      if (before < rank && rank <= before + lane_total) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (rank <= before + counts[j]) {
            shared_prefix = prefix | (static_cast<uint64_t>(255 - 8 * lane - j) << shift);
            shared_rank = rank - before;
            shared_done = rank - before == counts[j];  // the whole bin is kept
            break;
          }
          before += counts[j];
        }
      }
    }
    __syncthreads();  // (warp 0 writes the shared_* values again two barriers after these reads)
    prefix = shared_prefix, rank = shared_rank, mask |= static_cast<uint64_t>(0xFF) << shift;
    if (shared_done) break;
  }
  return prefix;
}

// Steps 3-4 for one image whose order keys are in shared `order` (n of them): the kept positions,
// compacted in index order into shared `rows` (k of them; into `index_image` too when write_index),
// then this block's share of the gather: of the `parts` blocks that gather the image, block `part`
// copies rows part, part + parts, ... (a warp per row). All threads of the block must call it.
template <typename scalar_t>
__device__ void select_and_gather(const uint32_t* order, int32_t* rows, int64_t n, int64_t k,
                                  const scalar_t* __restrict__ x_image, int64_t D, scalar_t* __restrict__ kept_image,
                                  int64_t* __restrict__ index_image, bool write_index, int64_t part, int64_t parts) {
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const uint64_t threshold = kth_largest_key(order, n, k);

  // Compaction in index order: each thread owns a contiguous run of positions.
  const int64_t per_thread = (n + blockDim.x - 1) / blockDim.x;
  const int64_t begin = smaller(n, tid * per_thread), end = smaller(n, begin + per_thread);
  int count = 0;
  for (int64_t i = begin; i < end; ++i) count += key_at(order, i) >= threshold;
  int position;
  BlockScan(scan_storage).ExclusiveSum(count, position);
  for (int64_t i = begin; i < end; ++i) {
    if (key_at(order, i) >= threshold) {
      if (write_index) index_image[position] = i;
      rows[position++] = static_cast<int32_t>(i);
    }
  }
  __syncthreads();  // rows is complete for the whole block after this

  // Gather: a warp per kept row.
  const int warps = blockDim.x / kWarpSize;
  constexpr int kVector = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
  const bool vectorized = sizeof(scalar_t) <= 16 && D % kVector == 0 &&
                          reinterpret_cast<uintptr_t>(x_image) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(kept_image) % 16 == 0;
  for (int64_t r = part + parts * warp; r < k; r += parts * warps) {
    const scalar_t* src = x_image + static_cast<int64_t>(rows[r]) * D;
    scalar_t* dst = kept_image + r * D;
    if (vectorized) {
      const uint4* s = reinterpret_cast<const uint4*>(src);
      uint4* d = reinterpret_cast<uint4*>(dst);
      const int64_t vectors = D / kVector;
#pragma unroll 4
      for (int64_t v = lane; v < vectors; v += kWarpSize) d[v] = __ldg(s + v);
    } else {
      for (int64_t e = lane; e < D; e += kWarpSize) dst[e] = src[e];
    }
  }
}

// Image blockIdx.x; its kept rows are gathered by gridDim.y blocks, each of which selects the image on
// its own (an image's keys are a few KiB and its selection a few microseconds; the copy is the costly
// part, and one block per image would leave most of the GPU idle at small batches). Block y = 0 writes
// the index. Dynamic shared memory: the order keys (max_length) and the kept rows (max_kept).
template <typename scalar_t, typename score_t>
__global__ void __launch_bounds__(kSelectThreads)
    select_topk_kernel(const scalar_t* __restrict__ x, const score_t* __restrict__ scores, SegmentTable segments,
                       int64_t D, int64_t max_length, scalar_t* __restrict__ kept, int64_t* __restrict__ index,
                       bool* __restrict__ finite) {
  extern __shared__ uint32_t order[];
  int32_t* rows = reinterpret_cast<int32_t*>(order + max_length);
  int64_t token_start, kept_start, n, k;
  segments.get(blockIdx.x, token_start, kept_start, n, k);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float score = static_cast<float>(scores[token_start + i]);
    if (!isfinite(score) && blockIdx.y == 0) *finite = false;  // any number of writers, all of the same value
    order[i] = order_bits(score);
  }
  __syncthreads();
  select_and_gather(order, rows, n, k, x + token_start * D, D, kept + kept_start * D, index + kept_start,
                    blockIdx.y == 0, blockIdx.y, gridDim.y);
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
  return value;
}

__device__ __forceinline__ float gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }

template <typename scalar_t, typename hidden_t>
__global__ void __launch_bounds__(kSelectThreads)
    score_select_kernel(const scalar_t* __restrict__ x, const hidden_t* __restrict__ hidden,
                        const float* __restrict__ col_sum, const float* __restrict__ bias,
                        const float* __restrict__ w2, const float* __restrict__ b2, float eps,
                        SegmentTable segments, int64_t D, int64_t H, int chunks_per_image, int64_t max_length,
                        unsigned int* __restrict__ arrivals, float* __restrict__ scores,
                        scalar_t* __restrict__ kept, int64_t* __restrict__ index, bool* __restrict__ finite) {
  extern __shared__ uint32_t order[];
  __shared__ bool last;
  const int64_t image = blockIdx.x / chunks_per_image;
  const int64_t chunk = blockIdx.x % chunks_per_image;
  int64_t token_start, kept_start, n, k;
  segments.get(image, token_start, kept_start, n, k);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const float bias2 = __ldg(b2);  // a device scalar, so the host never reads it

  // Scoring: a warp per token of this chunk.
  const int64_t first = chunk * kTokensPerScoreBlock, stop = smaller(n, first + kTokensPerScoreBlock);
  for (int64_t t = first + warp; t < stop; t += warps) {
    const scalar_t* row = x + (token_start + t) * D;
    float sum = 0.f;
    for (int64_t d = lane; d < D; d += kWarpSize) sum += static_cast<float>(row[d]);
    const float mean = warp_sum(sum) / static_cast<float>(D);
    float square = 0.f;
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const float centred = static_cast<float>(row[d]) - mean;
      square += centred * centred;
    }
    const float rstd = rsqrtf(warp_sum(square) / static_cast<float>(D) + eps);
    const hidden_t* h_row = hidden + (token_start + t) * H;
    float partial = 0.f;
    for (int64_t h = lane; h < H; h += kWarpSize) {
      const float pre = (static_cast<float>(h_row[h]) - mean * col_sum[h]) * rstd + bias[h];
      partial += w2[h] * gelu(pre);
    }
    const float score = warp_sum(partial) + bias2;
    if (lane == 0) {
      scores[token_start + t] = score;
      if (!isfinite(score)) *finite = false;
    }
  }

  // The last block of this image to arrive selects it.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int arrived = atomicAdd(arrivals + image, 1u);
    last = arrived == static_cast<unsigned int>(chunks_per_image - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) order[i] = order_bits(__ldcg(scores + token_start + i));
  __syncthreads();
  select_and_gather(order, reinterpret_cast<int32_t*>(order + max_length), n, k, x + token_start * D, D,
                    kept + kept_start * D, index + kept_start, true, 0, 1);
}

// ---- host side ------------------------------------------------------------------------------

// The launch's `finite` flag: a 0-dim bool set to true by a memset on the stream (no kernel launch;
// captured by a CUDA graph like the kernel itself). The kernels only ever clear it.
at::Tensor finite_flag(const at::Tensor& like, cudaStream_t stream) {
  at::Tensor finite = at::empty({}, like.options().dtype(at::kBool));
  C10_CUDA_CHECK(cudaMemsetAsync(finite.mutable_data_ptr<bool>(), 1, sizeof(bool), stream));
  return finite;
}

struct Launch {
  SegmentTable segments;
  at::Tensor table;  // keeps the device table alive until the kernel is queued
};

Launch segment_table(const Segments& seg, at::IntArrayRef lengths, at::IntArrayRef ks, const at::Tensor& like) {
  bool regular = true;
  for (size_t b = 1; b < lengths.size(); ++b) regular &= lengths[b] == lengths[0] && ks[b] == ks[0];
  if (regular && !lengths.empty()) return {{nullptr, lengths[0], ks[0]}, at::Tensor()};
  at::Tensor host = at::empty({static_cast<int64_t>(4 * lengths.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = host.mutable_data_ptr<int64_t>();
  for (size_t b = 0; b < lengths.size(); ++b) {
    p[4 * b] = seg.token_start[b], p[4 * b + 1] = seg.kept_start[b], p[4 * b + 2] = lengths[b], p[4 * b + 3] = ks[b];
  }
  at::Tensor device = host.to(like.device());
  return {{device.const_data_ptr<int64_t>(), 0, 0}, device};
}

// Shared memory of one block = the kernel's static part (radix histogram, block-scan storage and
// flags, about 3 KiB, read from the compiled kernel) + the dynamic part (4 bytes per token of the
// longest image for its order keys, 4 per kept token of the largest budget for the kept rows). The
// rules: static + dynamic must fit the device's opt-in limit (sharedMemPerBlockOptin, e.g. 227 KiB on
// H100); and a kernel launches with more than 48 KiB in total only after its
// MaxDynamicSharedMemorySize attribute has been raised to the dynamic part (its default is
// 48 KiB - static). So the test is on static + dynamic, not on the dynamic part alone: N + K of about
// 11,470 to 12,288 has a dynamic part below 48 KiB, a total above. The attribute is per kernel and
// device and is only ever raised (under a lock), so a concurrent caller can never lower it under
// another's launch.
size_t shared_bytes_for(const Segments& seg, const void* kernel, const char* op) {
  const size_t bytes = static_cast<size_t>(seg.max_length + seg.max_kept) * sizeof(uint32_t);
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const size_t static_bytes = attributes.sharedSizeBytes;
  const size_t limit = static_cast<size_t>(optin);
  TORCH_CHECK(static_bytes + bytes <= limit, op, ": an image of N = ", seg.max_length, " tokens keeping K = ",
              seg.max_kept, " needs ", bytes, " bytes of dynamic shared memory (4 per token and 4 per kept token)",
              " plus ", static_bytes, " static bytes per block; this GPU (device ", device, ") allows ", optin,
              " bytes per block, so at most N + K = ",
              limit > static_bytes ? (limit - static_bytes) / sizeof(uint32_t) : 0, " per image");
  if (bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes))
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

// Blocks that gather one image in select_topk: enough for about two blocks per SM over the batch, but
// at least kMinRowsPerBlock kept rows each (every block repeats the image's selection).
constexpr int64_t kMinRowsPerBlock = 4;
unsigned int gather_parts(int64_t images, int64_t max_kept) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t for_the_gpu = (2 * static_cast<int64_t>(sms) + images - 1) / images;
  const int64_t for_the_rows = (max_kept + kMinRowsPerBlock - 1) / kMinRowsPerBlock;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(for_the_gpu, for_the_rows)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk_cuda(const at::Tensor& x, const at::Tensor& scores,
                                                                at::IntArrayRef lengths, at::IntArrayRef ks) {
  const Segments seg = check_select_inputs(x, scores, lengths, ks, c10::DeviceType::CUDA, "select_topk");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor kept = at::empty({seg.total_kept, x.size(1)}, x.options());
  at::Tensor index = at::empty({seg.total_kept}, x.options().dtype(at::kLong));
  at::Tensor finite = finite_flag(x, stream);
  if (lengths.empty()) return {kept, index, finite};
  const Launch launch = segment_table(seg, lengths, ks, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "select_topk_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "select_topk_cuda_scores", [&] {
      const auto kernel = select_topk_kernel<x_t, scalar_t>;
      const size_t shared = shared_bytes_for(seg, reinterpret_cast<const void*>(kernel), "select_topk");
      const dim3 grid(static_cast<unsigned int>(lengths.size()), gather_parts(lengths.size(), seg.max_kept));
      kernel<<<grid, kSelectThreads, shared, stream>>>(
          x.const_data_ptr<x_t>(), scores.const_data_ptr<scalar_t>(), launch.segments, x.size(1), seg.max_length,
          kept.mutable_data_ptr<x_t>(), index.mutable_data_ptr<int64_t>(), finite.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kept, index, finite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_select_cuda(
    const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& col_sum, const at::Tensor& bias,
    const at::Tensor& w2, const at::Tensor& b2, double eps, at::IntArrayRef lengths, at::IntArrayRef ks) {
  at::Tensor scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const Segments seg = check_select_inputs(x, scores, lengths, ks, c10::DeviceType::CUDA, "score_select");
  check_scorer_inputs(x, hidden, col_sum, bias, w2, b2, "score_select");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble,
              "score_select: hidden must be float32 or float64 on CUDA, got ", hidden.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor kept = at::empty({seg.total_kept, x.size(1)}, x.options());
  at::Tensor index = at::empty({seg.total_kept}, x.options().dtype(at::kLong));
  at::Tensor finite = finite_flag(x, stream);
  if (lengths.empty()) return {kept, index, scores, finite};
  const Launch launch = segment_table(seg, lengths, ks, x);
  const int64_t chunks = (seg.max_length + kTokensPerScoreBlock - 1) / kTokensPerScoreBlock;
  const int64_t blocks = chunks * static_cast<int64_t>(lengths.size());
  TORCH_CHECK(blocks < (int64_t{1} << 31), "score_select: too many tokens for one launch");
  // One arrival counter per image, zeroed on this stream before the kernel (see the top of the file).
  const at::Tensor arrival_counters = at::zeros({static_cast<int64_t>(lengths.size())}, x.options().dtype(at::kInt));
  unsigned int* arrivals = reinterpret_cast<unsigned int*>(arrival_counters.mutable_data_ptr<int>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "score_select_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "score_select_cuda_hidden", [&] {
      const auto kernel = score_select_kernel<x_t, scalar_t>;
      const size_t shared = shared_bytes_for(seg, reinterpret_cast<const void*>(kernel), "score_select");
      // Every image gets `chunks` blocks (chunks of a shorter image past its end only arrive).
      kernel<<<static_cast<unsigned int>(blocks), kSelectThreads, shared, stream>>>(
          x.const_data_ptr<x_t>(), hidden.const_data_ptr<scalar_t>(), col_sum.const_data_ptr<float>(),
          bias.const_data_ptr<float>(), w2.const_data_ptr<float>(), b2.const_data_ptr<float>(), static_cast<float>(eps),
          launch.segments, x.size(1), hidden.size(1), static_cast<int>(chunks), seg.max_length, arrivals,
          scores.mutable_data_ptr<float>(), kept.mutable_data_ptr<x_t>(), index.mutable_data_ptr<int64_t>(),
          finite.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kept, index, scores, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(autoselect_C, CUDA, m) {
  m.impl("select_topk", &select_topk_cuda);
  m.impl("score_select", &score_select_cuda);
}

}  // namespace autoselect
