// Host-side contract of the noise gate (DESIGN.md 1.3), shared by the CPU and CUDA kernels:
//   z = mean + sqrt(alpha) * (x - mean) + sqrt(1 - alpha) * std * eps
// x (..., D) contiguous; alpha, mean, std in the op-math type of x (float, or double for double x);
// eps from `noise` (same shape and dtype as x) when given, else drawn in-kernel from (seed, offset)
// by the contract of philox.h. The Python layer validates first; these checks keep a direct call of
// torch.ops.autoselect_C.* from crashing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace autoselect {

// Clamp applied to alpha inside the two denominators of the alpha gradient only.
constexpr double kAlphaGradClamp = 1e-6;

inline void check_noise_gate_inputs(const at::Tensor& x, const at::Tensor& alpha,
                                    const at::Tensor& mean, const at::Tensor& std,
                                    const std::optional<at::Tensor>& noise, int64_t seed,
                                    int64_t offset, c10::DeviceType device_type,
                                    const char* op) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be on ", device_type, ", got ",
              x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a channel dimension, got a 0-d tensor");
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t D = x.size(-1);
  int64_t rows = 1;  // tokens: the product of all but the last dimension (also when D == 0)
  for (int64_t dim = 0; dim + 1 < x.dim(); ++dim) rows *= x.size(dim);
  for (const at::Tensor* t : {&alpha, &mean, &std}) {
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device(),
                ", got one on ", t->device());
    TORCH_CHECK(t->scalar_type() == opmath, op, ": alpha, mean and std must be ", opmath,
                " for x of ", x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": alpha, mean and std must be contiguous");
  }
  TORCH_CHECK(alpha.numel() == rows, op, ": alpha must hold one value per token (", rows,
              "), got ", alpha.numel());
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == D, op, ": mean must have shape (", D, "), got ",
              mean.sizes());
  TORCH_CHECK(std.dim() == 1 && std.size(0) == D, op, ": std must have shape (", D, "), got ",
              std.sizes());
  if (noise.has_value()) {
    TORCH_CHECK(noise->device() == x.device(), op, ": noise must be on ", x.device());
    TORCH_CHECK(noise->sizes() == x.sizes(), op, ": noise must have the shape of x ", x.sizes(),
                ", got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), op, ": noise must have the dtype of x");
    TORCH_CHECK(noise->is_contiguous(), op, ": noise must be contiguous");
  }
  TORCH_CHECK(seed >= 0 && offset >= 0, op, ": seed and offset must be non-negative, got seed=",
              seed, ", offset=", offset);
}

}  // namespace autoselect
