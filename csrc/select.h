// Top-K token selection (DESIGN.md 1.6), shared by the CPU and CUDA kernels.
//
// Packed layout: the tokens of all images concatenated, x (T, D) and scores (T,), with lengths[b]
// tokens and a budget ks[b] per image; outputs kept (sum ks, D) and index (sum ks,) int64, the
// kept positions of each image ascending (local to the image).
//
// Order: score descending, then index ascending (ties go to the lower index). Both are folded into
// one 64-bit key per token, unique within an image, so "the K largest keys" is exact:
//   key = (order_bits(score) << 32) | (0xFFFFFFFF - index)
// order_bits maps a float to a uint32 whose unsigned order is the float order, with -0.0 and +0.0
// equal. NaN maps to a fixed extreme, so the selection stays deterministic; the kernels also return
// `finite` (a 0-dim bool, false when any score was NaN or inf), which the Python op turns into an error
// with one device assert (no second pass over the scores, no host read).
//
// Fused scoring (score_select): the Scorer LayerNorm(D) -> Linear(D, H) -> GELU -> Linear(H, 1)
// with the LayerNorm's affine folded into the first layer, W' = W1 * gamma, b' = b1 + W1 @ beta,
// c = rowsum(W'), so that one plain GEMM of the raw tokens, hidden = x @ W'^T, is enough:
//   h_t = (hidden_t - mean_t * c) * rstd_t + b',   score_t = w2 . gelu(h_t) + b2
// where mean_t and rstd_t = 1 / sqrt(var_t + eps) are the token's own statistics over D.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "device_macros.h"

namespace autoselect {

AUTOSELECT_HD uint32_t order_bits(float value) {
  value = value + 0.0f;  // -0.0 -> +0.0
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

AUTOSELECT_HD uint64_t select_key(float score, uint32_t index) {
  return (static_cast<uint64_t>(order_bits(score)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

AUTOSELECT_HD uint32_t key_index(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

// Checks of the packed inputs; returns the start of each image's tokens and of its kept rows.
struct Segments {
  std::vector<int64_t> token_start, kept_start;
  int64_t total_tokens = 0, total_kept = 0, max_length = 0, max_kept = 0;
};

inline Segments check_select_inputs(const at::Tensor& x, const at::Tensor& scores, at::IntArrayRef lengths,
                                    at::IntArrayRef ks, c10::DeviceType device_type, const char* op) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be on ", device_type, ", got ", x.device());
  TORCH_CHECK(scores.device() == x.device(), op, ": scores must be on ", x.device(), ", got ",
              scores.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be packed as (T, D), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() && scores.is_contiguous(), op, ": x and scores must be contiguous");
  TORCH_CHECK(x.is_floating_point() && scores.is_floating_point(), op,
              ": x and scores must be floating-point tensors");
  TORCH_CHECK(lengths.size() == ks.size(), op, ": lengths and ks must have one entry per image, got ",
              lengths.size(), " and ", ks.size());
  Segments seg;
  for (size_t b = 0; b < lengths.size(); ++b) {
    TORCH_CHECK(lengths[b] >= 1 && lengths[b] < (int64_t(1) << 31), op, ": image ", b,
                " must have between 1 and 2^31 - 1 tokens, got ", lengths[b]);
    TORCH_CHECK(ks[b] >= 1 && ks[b] <= lengths[b], op, ": image ", b, " keeps k=", ks[b],
                ", which must lie in [1, ", lengths[b], "]");
    seg.token_start.push_back(seg.total_tokens);
    seg.kept_start.push_back(seg.total_kept);
    seg.total_tokens += lengths[b];
    seg.total_kept += ks[b];
    seg.max_length = std::max<int64_t>(seg.max_length, lengths[b]);
    seg.max_kept = std::max<int64_t>(seg.max_kept, ks[b]);
  }
  TORCH_CHECK(x.size(0) == seg.total_tokens, op, ": x has ", x.size(0), " tokens, the lengths add up to ",
              seg.total_tokens);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == seg.total_tokens, op, ": scores must have shape (",
              seg.total_tokens, "), got ", scores.sizes());
  return seg;
}

inline void check_scorer_inputs(const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& col_sum,
                                const at::Tensor& bias, const at::Tensor& w2, const at::Tensor& b2,
                                const char* op) {
  TORCH_CHECK(hidden.device() == x.device() && col_sum.device() == x.device() && bias.device() == x.device() &&
                  w2.device() == x.device() && b2.device() == x.device(),
              op, ": all tensors must be on ", x.device());
  // b2 stays a tensor (read by the kernel, never by the host), so a call does not synchronise.
  TORCH_CHECK(b2.numel() == 1 && b2.scalar_type() == at::kFloat, op, ": b2 must be one float32 value, got ",
              b2.sizes(), " ", b2.scalar_type());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == x.size(0), op, ": hidden must have shape (", x.size(0),
              ", H), got ", hidden.sizes());
  TORCH_CHECK(hidden.is_contiguous(), op, ": hidden must be contiguous");
  const int64_t H = hidden.size(1);
  for (const at::Tensor* t : {&col_sum, &bias, &w2}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == H, op, ": the scorer vectors must have shape (", H, "), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), op,
                ": the scorer vectors must be contiguous float32");
  }
}

}  // namespace autoselect
