// Top-K token selection on the CPU (DESIGN.md 1.6), plain and fused with the Scorer's tail.
//
// select_topk:  per image, the K largest 64-bit keys (select.h: score, then lower index) by
//               std::nth_element (linear on average), the kept positions sorted ascending, the rows
//               gathered with memcpy. Images run in parallel; the gather runs over all kept rows.
//               The pass that builds the keys also notes whether every score is finite.
// score_select: first the scores of every token from the first layer's GEMM output (select.h),
//               in parallel over tokens, then the same selection. The GEMM itself is torch's.
#include "select.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace autoselect {
namespace {

constexpr int64_t kGrainBytes = 1 << 16;

// The kept positions of every image (local, ascending) into index_out, from float scores; returns
// whether every score is finite.
bool select_indices(const float* scores, const Segments& seg, at::IntArrayRef lengths, at::IntArrayRef ks,
                    int64_t* index_out) {
  std::vector<char> finite(lengths.size(), 1);  // one flag per image: no two threads write the same one
  at::parallel_for(0, static_cast<int64_t>(lengths.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lengths[b], k = ks[b];
      const float* s = scores + seg.token_start[b];
      keys.resize(n);
      bool all_finite = true;
      for (int64_t i = 0; i < n; ++i) {
        all_finite &= std::isfinite(s[i]);
        keys[i] = select_key(s[i], static_cast<uint32_t>(i));
      }
      finite[b] = all_finite;
      if (k < n) std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
      int64_t* out = index_out + seg.kept_start[b];
      for (int64_t j = 0; j < k; ++j) out[j] = key_index(keys[j]);
      std::sort(out, out + k);
    }
  });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

void gather_rows(const at::Tensor& x, const Segments& seg, at::IntArrayRef ks, const int64_t* index,
                 at::Tensor& kept) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(kept.mutable_data_ptr());
  // The image of each kept row, so that any range of rows can be copied on its own.
  std::vector<int64_t> row_start(seg.total_kept);
  for (size_t b = 0; b < ks.size(); ++b)
    std::fill_n(row_start.begin() + seg.kept_start[b], ks[b], seg.token_start[b]);
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, seg.total_kept, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      std::memcpy(dst + r * row_bytes, src + (row_start[r] + index[r]) * row_bytes, row_bytes);
  });
}

// (kept, index, finite), finite a 0-dim bool.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_from_scores(const at::Tensor& x, const at::Tensor& scores_f32,
                                                                  const Segments& seg, at::IntArrayRef lengths,
                                                                  at::IntArrayRef ks) {
  at::Tensor index = at::empty({seg.total_kept}, x.options().dtype(at::kLong));
  at::Tensor kept = at::empty({seg.total_kept, x.size(1)}, x.options());
  at::Tensor finite = at::empty({}, x.options().dtype(at::kBool));
  *finite.mutable_data_ptr<bool>() =
      select_indices(scores_f32.const_data_ptr<float>(), seg, lengths, ks, index.mutable_data_ptr<int64_t>());
  gather_rows(x, seg, ks, index.const_data_ptr<int64_t>(), kept);
  return {kept, index, finite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk_cpu(const at::Tensor& x, const at::Tensor& scores,
                                                               at::IntArrayRef lengths, at::IntArrayRef ks) {
  const Segments seg = check_select_inputs(x, scores, lengths, ks, c10::DeviceType::CPU, "select_topk");
  return select_from_scores(x, scores.to(at::kFloat).contiguous(), seg, lengths, ks);
}

// ---- fused scoring ----------------------------------------------------------------------------
// Per token: mean and variance over D in one pass (shifted by the row's first value, eight float
// accumulators so the compiler vectorises without reassociating), then the folded LayerNorm, GELU
// and the H -> 1 dot in blocks of eight. GELU's erf is a rational minimax approximation on
// [-4, 4] (|error| < 5e-7, erf(+-4) is 1 to float precision there): pure multiply-adds, so it
// vectorises, where a libm call per hidden unit would cost more than the GEMM's epilogue should.

constexpr int kLanes8 = 8;

inline float erf_rational(float x) {
  x = std::min(4.0f, std::max(-4.0f, x));
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// (mean, 1 / sqrt(var + eps)) of one row of float values.
AUTOSELECT_TARGET_CLONES
void row_statistics(const float* row, int64_t D, double eps, float& mean, float& rstd) {
  const float shift = row[0];
  float sum[kLanes8] = {}, square[kLanes8] = {};
  int64_t d = 0;
  for (; d + kLanes8 <= D; d += kLanes8) {
    for (int lane = 0; lane < kLanes8; ++lane) {
      const float centred = row[d + lane] - shift;
      sum[lane] += centred;
      square[lane] += centred * centred;
    }
  }
  double total = 0.0, total_square = 0.0;
  for (; d < D; ++d) {
    const double centred = static_cast<double>(row[d]) - shift;
    total += centred;
    total_square += centred * centred;
  }
  for (int lane = 0; lane < kLanes8; ++lane) total += sum[lane], total_square += square[lane];
  const double shifted_mean = total / static_cast<double>(D);
  const double variance = std::max(0.0, total_square / static_cast<double>(D) - shifted_mean * shifted_mean);
  mean = static_cast<float>(shift + shifted_mean);
  rstd = static_cast<float>(1.0 / std::sqrt(variance + eps));
}

// w2 . gelu((hidden - mean * col_sum) * rstd + bias) for one token.
AUTOSELECT_TARGET_CLONES
float gelu_dot(const float* hidden, const float* col_sum, const float* bias, const float* w2, int64_t H, float mean,
               float rstd) {
  float acc[kLanes8] = {};
  int64_t h = 0;
  for (; h + kLanes8 <= H; h += kLanes8) {
    for (int lane = 0; lane < kLanes8; ++lane) {
      const float pre = (hidden[h + lane] - mean * col_sum[h + lane]) * rstd + bias[h + lane];
      acc[lane] += w2[h + lane] * (0.5f * pre * (1.0f + erf_rational(pre * 0.70710678118654752f)));
    }
  }
  float score = 0.0f;
  for (; h < H; ++h) {
    const float pre = (hidden[h] - mean * col_sum[h]) * rstd + bias[h];
    score += w2[h] * (0.5f * pre * (1.0f + erf_rational(pre * 0.70710678118654752f)));
  }
  for (int lane = 0; lane < kLanes8; ++lane) score += acc[lane];
  return score;
}

template <typename T>
const float* as_float_row(const T* row, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer.data();
  }
}

template <typename scalar_t, typename hidden_t>
void score_tokens(const at::Tensor& x, const at::Tensor& hidden, const float* col_sum, const float* bias,
                  const float* w2, float b2, double eps, float* scores) {
  const int64_t T = x.size(0), D = x.size(1), H = hidden.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const hidden_t* hp = hidden.const_data_ptr<hidden_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(D + H, 1));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row_buffer, hidden_buffer;
    for (int64_t t = begin; t < end; ++t) {
      float mean, rstd;
      row_statistics(as_float_row(xp + t * D, D, row_buffer), D, eps, mean, rstd);
      scores[t] = gelu_dot(as_float_row(hp + t * H, H, hidden_buffer), col_sum, bias, w2, H, mean, rstd) + b2;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_select_cpu(
    const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& col_sum, const at::Tensor& bias,
    const at::Tensor& w2, const at::Tensor& b2, double eps, at::IntArrayRef lengths, at::IntArrayRef ks) {
  const Segments seg = check_select_inputs(x, at::empty({x.size(0)}, x.options()), lengths, ks,
                                           c10::DeviceType::CPU, "score_select");
  check_scorer_inputs(x, hidden, col_sum, bias, w2, b2, "score_select");
  at::Tensor scores = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "score_select_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "score_select_cpu_hidden", [&] {
      score_tokens<x_t, scalar_t>(x, hidden, col_sum.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                  w2.const_data_ptr<float>(), *b2.const_data_ptr<float>(), eps,
                                  scores.mutable_data_ptr<float>());
    });
  });
  auto [kept, index, finite] = select_from_scores(x, scores, seg, lengths, ks);
  return {kept, index, scores, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(autoselect_C, CPU, m) {
  m.impl("select_topk", &select_topk_cpu);
  m.impl("score_select", &score_select_cpu);
}

}  // namespace autoselect
