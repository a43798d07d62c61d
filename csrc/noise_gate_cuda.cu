// Variance-preserving noise gate on CUDA (DESIGN.md 1.3), forward and backward.
//
// forward:  z = mean + sqrt(a) * (x - mean) + sqrt(1 - a) * std * eps
// backward: dx = sqrt(a) * g
//           da = sum_D g * (x - mean) / (2 sqrt(a_c)) - sum_D g * std * eps / (2 sqrt(1 - a_c))
// One warp per row (token): alpha is read once per row and the alpha gradient is a warp reduction.
// When D % 4 == 0 and the pointers allow it, each lane moves four consecutive elements with one
// vector load and draws their four normals with one Philox evaluation (philox.h); other widths draw
// element by element (4x the RNG work). eps is regenerated in backward, never stored.
#include "noise_gate.h"
#include "philox.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace autoselect {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
bool aligned_for_pack4(const T* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack4<T>) == 0;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
  return value;
}

template <typename scalar_t, bool kHasNoise, bool kPacked>
__global__ void noise_gate_forward_kernel(const scalar_t* __restrict__ x,
                                          const at::opmath_type<scalar_t>* __restrict__ alpha,
                                          const at::opmath_type<scalar_t>* __restrict__ mean,
                                          const at::opmath_type<scalar_t>* __restrict__ std,
                                          const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                                          int64_t rows, int64_t D, uint64_t seed, uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const opmath_t a = alpha[row];
  const opmath_t keep = sqrt(a), drop = sqrt(opmath_t(1) - a);
  const int64_t base = row * D;
  if (kPacked) {
    for (int64_t d = 4 * lane; d < D; d += 4 * kWarpSize) {
      const Pack4<scalar_t> xv = *reinterpret_cast<const Pack4<scalar_t>*>(x + base + d);
      Pack4<scalar_t> eps_packed;
      Normal4 drawn;
      if (kHasNoise) {
        eps_packed = *reinterpret_cast<const Pack4<scalar_t>*>(noise + base + d);
      } else {
        drawn = randn4x(seed, offset + static_cast<uint64_t>(base + d) / 4);
      }
      Pack4<scalar_t> zv;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const opmath_t eps = kHasNoise ? static_cast<opmath_t>(eps_packed.v[k]) : static_cast<opmath_t>(drawn.v[k]);
        const opmath_t m = mean[d + k];
        zv.v[k] = static_cast<scalar_t>(m + keep * (static_cast<opmath_t>(xv.v[k]) - m) + drop * std[d + k] * eps);
      }
      *reinterpret_cast<Pack4<scalar_t>*>(out + base + d) = zv;
    }
  } else {
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const opmath_t eps = kHasNoise ? static_cast<opmath_t>(noise[base + d])
                                     : static_cast<opmath_t>(gate_noise(seed, offset, base + d));
      const opmath_t m = mean[d];
      out[base + d] = static_cast<scalar_t>(m + keep * (static_cast<opmath_t>(x[base + d]) - m) + drop * std[d] * eps);
    }
  }
}

template <typename scalar_t, bool kHasNoise, bool kPacked>
__global__ void noise_gate_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                           const at::opmath_type<scalar_t>* __restrict__ alpha,
                                           const at::opmath_type<scalar_t>* __restrict__ mean,
                                           const at::opmath_type<scalar_t>* __restrict__ std,
                                           const scalar_t* __restrict__ noise, scalar_t* __restrict__ grad_x,
                                           at::opmath_type<scalar_t>* __restrict__ grad_alpha, int64_t rows,
                                           int64_t D, uint64_t seed, uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const opmath_t a = alpha[row];
  const opmath_t keep = sqrt(a);
  const int64_t base = row * D;
  acc_t signal = 0, noise_sum = 0;
  if (kPacked) {
    for (int64_t d = 4 * lane; d < D; d += 4 * kWarpSize) {
      const Pack4<scalar_t> gv = *reinterpret_cast<const Pack4<scalar_t>*>(grad + base + d);
      if (grad_x != nullptr) {
        Pack4<scalar_t> dxv;
#pragma unroll
        for (int k = 0; k < 4; ++k) dxv.v[k] = static_cast<scalar_t>(keep * static_cast<opmath_t>(gv.v[k]));
        *reinterpret_cast<Pack4<scalar_t>*>(grad_x + base + d) = dxv;
      }
      if (grad_alpha == nullptr) continue;
      const Pack4<scalar_t> xv = *reinterpret_cast<const Pack4<scalar_t>*>(x + base + d);
      Pack4<scalar_t> eps_packed;
      Normal4 drawn;
      if (kHasNoise) {
        eps_packed = *reinterpret_cast<const Pack4<scalar_t>*>(noise + base + d);
      } else {
        drawn = randn4x(seed, offset + static_cast<uint64_t>(base + d) / 4);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const opmath_t g = static_cast<opmath_t>(gv.v[k]);
        const opmath_t eps = kHasNoise ? static_cast<opmath_t>(eps_packed.v[k]) : static_cast<opmath_t>(drawn.v[k]);
        signal += g * (static_cast<opmath_t>(xv.v[k]) - mean[d + k]);
        noise_sum += g * std[d + k] * eps;
      }
    }
  } else {
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const opmath_t g = static_cast<opmath_t>(grad[base + d]);
      if (grad_x != nullptr) grad_x[base + d] = static_cast<scalar_t>(keep * g);
      if (grad_alpha == nullptr) continue;
      const opmath_t eps = kHasNoise ? static_cast<opmath_t>(noise[base + d])
                                     : static_cast<opmath_t>(gate_noise(seed, offset, base + d));
      signal += g * (static_cast<opmath_t>(x[base + d]) - mean[d]);
      noise_sum += g * std[d] * eps;
    }
  }
  if (grad_alpha == nullptr) return;
  signal = warp_sum(signal);
  noise_sum = warp_sum(noise_sum);
  if (lane == 0) {
    const opmath_t lo = static_cast<opmath_t>(kAlphaGradClamp);
    const opmath_t a_c = fmin(fmax(a, lo), opmath_t(1) - lo);
    grad_alpha[row] = static_cast<opmath_t>(signal / (2 * sqrt(a_c)) - noise_sum / (2 * sqrt(opmath_t(1) - a_c)));
  }
}

// Calls fn(std::integral_constant<bool, has_noise>, std::integral_constant<bool, packed>).
template <typename Fn>
void dispatch_variant(bool has_noise, bool packed, Fn&& fn) {
  if (has_noise) {
    packed ? fn(std::true_type{}, std::true_type{}) : fn(std::true_type{}, std::false_type{});
  } else {
    packed ? fn(std::false_type{}, std::true_type{}) : fn(std::false_type{}, std::false_type{});
  }
}

dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

at::Tensor noise_gate_forward_cuda(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& mean,
                                   const at::Tensor& std, const std::optional<at::Tensor>& noise, int64_t seed,
                                   int64_t offset) {
  check_noise_gate_inputs(x, alpha, mean, std, noise, seed, offset, c10::DeviceType::CUDA, "noise_gate_forward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(rows / kWarpsPerBlock < (int64_t{1} << 31), "noise_gate_forward: too many rows (", rows, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_gate_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* noise_ptr = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    const bool packed = D % 4 == 0 && aligned_for_pack4(x.const_data_ptr<scalar_t>()) &&
                        aligned_for_pack4(out.const_data_ptr<scalar_t>()) && aligned_for_pack4(noise_ptr);
    dispatch_variant(noise.has_value(), packed, [&](auto has_noise, auto packed_v) {
      noise_gate_forward_kernel<scalar_t, decltype(has_noise)::value, decltype(packed_v)::value>
          <<<grid_for(rows), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<opmath_t>(), mean.const_data_ptr<opmath_t>(),
              std.const_data_ptr<opmath_t>(), noise_ptr, out.mutable_data_ptr<scalar_t>(), rows, D,
              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> noise_gate_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& std, const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, bool need_x_grad,
    bool need_alpha_grad) {
  check_noise_gate_inputs(x, alpha, mean, std, noise, seed, offset, c10::DeviceType::CUDA, "noise_gate_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "noise_gate_backward: grad must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_x = need_x_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_alpha = need_alpha_grad ? at::empty_like(alpha) : at::empty({0}, alpha.options());
  if (x.numel() == 0 || !(need_x_grad || need_alpha_grad)) {
    if (need_alpha_grad) grad_alpha.zero_();
    return {grad_x, grad_alpha};
  }
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(rows / kWarpsPerBlock < (int64_t{1} << 31), "noise_gate_backward: too many rows (", rows, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_gate_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* noise_ptr = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_x_ptr = need_x_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    const bool packed = D % 4 == 0 && aligned_for_pack4(g.const_data_ptr<scalar_t>()) &&
                        aligned_for_pack4(x.const_data_ptr<scalar_t>()) && aligned_for_pack4(noise_ptr) &&
                        aligned_for_pack4(static_cast<const scalar_t*>(grad_x_ptr));
    dispatch_variant(noise.has_value(), packed, [&](auto has_noise, auto packed_v) {
      noise_gate_backward_kernel<scalar_t, decltype(has_noise)::value, decltype(packed_v)::value>
          <<<grid_for(rows), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<opmath_t>(),
              mean.const_data_ptr<opmath_t>(), std.const_data_ptr<opmath_t>(), noise_ptr, grad_x_ptr,
              need_alpha_grad ? grad_alpha.mutable_data_ptr<opmath_t>() : nullptr, rows, D,
              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(autoselect_C, CUDA, m) {
  m.impl("noise_gate_forward", &noise_gate_forward_cuda);
  m.impl("noise_gate_backward", &noise_gate_backward_cuda);
}

}  // namespace autoselect
