// Variance-preserving noise gate on the CPU (DESIGN.md 1.3), forward and backward.
//
// forward:  z = mean + sqrt(a) * (x - mean) + sqrt(1 - a) * std * eps
// backward: dx = sqrt(a) * g
//           da = sum_D g * (x - mean) / (2 sqrt(a_c)) - sum_D g * std * eps / (2 sqrt(1 - a_c)),
//           a_c = clamp(a, 1e-6, 1 - 1e-6)
// eps is regenerated in backward from (seed, offset) (philox.h), so nothing of the size of x is
// kept between the two passes. Rows (tokens) are split across threads with at::parallel_for; the
// math runs in at::opmath_type, the row sums of the alpha gradient in at::acc_type (double).
#include "noise_gate.h"
#include "philox.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace autoselect {
namespace {

// Enough elements per task that the thread pool's overhead stays small.
constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(D, 1)); }

// ---- SIMD noise: the RNG contract of philox.h for eight counters at a time ----------------------
// Scalar libm log/sin/cos would make this kernel slower than eager PyTorch (whose randn is
// vectorized), so eight counters run together through Philox and through polynomial log and sincos,
// written with GCC/Clang vector types: one source for SSE, AVX2 and AVX-512 (picked at run time by
// target_clones) or NEON.
//
// Accuracy. The contract's normals are n0 = radius cos(theta), n1 = radius sin(theta) with the
// float32 uniforms u0, u1, radius = sqrt(-2 log(max(u0, 1e-7))) and theta = float32(2 pi * u1)
// (Triton rounds theta to float32 before its sin and cos, and so do the CUDA kernel and the PyTorch
// reference). From the float32 inputs u0 and theta on, everything below runs in float64 and is
// rounded to float32 once, at the end: the log through atanh's series (truncation below 1e-10
// relative), the reduction of theta by multiples of pi/2 with a two-part pi/2 whose first part
// keeps k * (pi/2)_hi exact, and Taylor polynomials on [-pi/4, pi/4] (truncation below 2e-10). So
// each normal is within about half a float32 ulp of the exact value on the same float32 inputs, on
// every clone (SSE without FMA included): tests/test_noise_accuracy.py checks it against float64.
// (The float32 polynomials used before were a few ulps off, and on the baseline clone, without FMA,
// up to 1.4e-7 off near theta = 3 pi / 2.) The test also compiles this section on its own (from the
// "SIMD noise" line to the end of randn4x_lanes) for the baseline and AVX2 clones, which the
// installed extension may never run on the test machine: keep the section free of torch.

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

constexpr int kLanes = 8;

#define AUTOSELECT_INLINE __attribute__((always_inline)) inline

AUTOSELECT_INLINE f32x8 as_float(u32x8 v) { return reinterpret_cast<f32x8>(v); }
AUTOSELECT_INLINE u32x8 as_bits(f32x8 v) { return reinterpret_cast<u32x8>(v); }
AUTOSELECT_INLINE u32x8 select(u32x8 mask, u32x8 if_set, u32x8 if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}
AUTOSELECT_INLINE f64x8 widen(f32x8 v) { return __builtin_convertvector(v, f64x8); }
AUTOSELECT_INLINE f32x8 narrow(f64x8 v) { return __builtin_convertvector(v, f32x8); }

// (hi, lo) 32-bit halves of the 64-bit products a * b, lane by lane.
AUTOSELECT_INLINE void mul_wide(uint32_t a, u32x8 b, u32x8& hi, u32x8& lo) {
  const u64x8 product = __builtin_convertvector(b, u64x8) * static_cast<uint64_t>(a);
  hi = __builtin_convertvector(product >> 32, u32x8);
  lo = __builtin_convertvector(product, u32x8);
}

// Triton's uint_to_uniform_float: int32 x, x < 0 -> ~x (x ^ (x >> 31)), times 4.6566127342e-10
// (as float32 that is exactly 2^-31, so the only rounding is the int -> float conversion).
AUTOSELECT_INLINE f32x8 uniform(u32x8 bits) {
  const i32x8 x = reinterpret_cast<i32x8>(bits);
  return __builtin_convertvector(x ^ (x >> 31), f32x8) * 4.6566127342e-10f;
}

// sqrt(-2 log u) in float64 for normal positive floats u <= 1: u = m * 2^e exactly, with
// m in [sqrt(1/2), sqrt(2)) (from u's bits), then log(m) = 2 atanh(t), t = (m - 1) / (m + 1),
// |t| < 0.172, by its odd series to t^11 (the first term left out is below 5e-11 relative).
AUTOSELECT_INLINE f64x8 box_muller_radius(f32x8 u) {
  const u32x8 bits = as_bits(u);
  const u32x8 mantissa = (bits & 0x007FFFFFu) | 0x3F800000u;          // in [1, 2)
  const u32x8 high = reinterpret_cast<u32x8>(mantissa > 0x3FB504F3u);  // above sqrt(2): halve it
  const f64x8 m = widen(as_float(select(high, mantissa - 0x00800000u, mantissa)));
  const i32x8 exponent = reinterpret_cast<i32x8>(bits >> 23) - 127 - reinterpret_cast<i32x8>(high);
  const f64x8 e = __builtin_convertvector(exponent, f64x8);
  const f64x8 t = (m - 1.0) / (m + 1.0);  // m - 1 and m + 1 are exact
  const f64x8 t2 = t * t;
  const f64x8 series =
      1.0 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))));
  const f64x8 minus_two_log = -2.0 * (e * 0.6931471805599453 + 2.0 * t * series);  // >= 0
  f64x8 out;
  for (int j = 0; j < kLanes; ++j) out[j] = __builtin_sqrt(minus_two_log[j]);
  return out;
}

// (radius cos theta, radius sin theta) for float theta in [0, 2 pi]: theta = k pi/2 + r, k in 0..4,
// |r| <= pi/4; r = (theta - k P1) - k P2 with P1 = pi/2 to 33 bits, so k P1 and theta - k P1 are
// exact in float64 (with or without FMA), and P1 + P2 = pi/2 to 1e-21. Then Taylor polynomials of
// sin r and cos r, both products rounded once to float, and a swap and sign flips by quadrant.
AUTOSELECT_INLINE void polar(f64x8 radius, f32x8 theta, f32x8& cos_out, f32x8& sin_out) {
  const i32x8 quadrant = __builtin_convertvector(theta * 0.636619772f + 0.5f, i32x8);  // theta >= 0
  const f64x8 k = __builtin_convertvector(quadrant, f64x8);
  const f64x8 r = (widen(theta) - k * 1.57079632673412561417e+00) - k * 6.07710050650619224932e-11;
  const f64x8 r2 = r * r;
  const f64x8 s = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
                                                                                    r2 * (-1.0 / 39916800)))));
  const f64x8 c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 +
                                                                               r2 * (-1.0 / 3628800)))));
  const f32x8 rs = narrow(radius * s), rc = narrow(radius * c);
  const u32x8 q = reinterpret_cast<u32x8>(quadrant);
  const u32x8 swap = 0u - (q & 1u);
  const u32x8 sin_bits = select(swap, as_bits(rc), as_bits(rs));
  const u32x8 cos_bits = select(swap, as_bits(rs), as_bits(rc));
  sin_out = as_float(sin_bits ^ (((q >> 1) & 1u) << 31));        // negative in quadrants 2, 3
  cos_out = as_float(cos_bits ^ ((((q + 1u) >> 1) & 1u) << 31));  // negative in quadrants 1, 2
}

// out[4 j + k] = component k of randn4x(seed, counter0 + j), j < 8.
AUTOSELECT_TARGET_CLONES  // csrc/device_macros.h
void randn4x_lanes(float* __restrict__ out, uint64_t seed, uint64_t counter0) {
  u32x8 c0, c1, c2 = {}, c3 = {};
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t counter = counter0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(counter);
    c1[j] = static_cast<uint32_t>(counter >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    u32x8 hi_b, lo_b, hi_a, lo_a;
    mul_wide(0xCD9E8D57u, c2, hi_b, lo_b);
    mul_wide(0xD2511F53u, c0, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const f32x8 u0 = uniform(c0), u2 = uniform(c2);
  const f64x8 r01 = box_muller_radius(u0 > 1.0e-7f ? u0 : 1.0e-7f);
  const f64x8 r23 = box_muller_radius(u2 > 1.0e-7f ? u2 : 1.0e-7f);
  f32x8 n0, n1, n2, n3;
  polar(r01, 6.283185307179586f * uniform(c1), n0, n1);  // theta rounded to float32, as Triton's
  polar(r23, 6.283185307179586f * uniform(c3), n2, n3);
  for (int j = 0; j < kLanes; ++j) {
    out[4 * j] = n0[j];
    out[4 * j + 1] = n1[j];
    out[4 * j + 2] = n2[j];
    out[4 * j + 3] = n3[j];
  }
}

// eps for flat elements [start, start + count) of the call's noise stream, into buf.
void fill_gate_noise(float* buf, uint64_t seed, uint64_t offset, int64_t start, int64_t count) {
  alignas(64) float block[4 * kLanes];
  int64_t i = start;
  const int64_t end = start + count;
  while (i < end) {
    const int64_t group = i >> 2;
    randn4x_lanes(block, seed, offset + static_cast<uint64_t>(group));
    const int64_t block_end = std::min<int64_t>(end, (group + kLanes) * 4);
    for (; i < block_end; ++i) buf[i - start] = block[i - group * 4];
  }
}

template <typename scalar_t>
void forward_rows(const scalar_t* x, const at::opmath_type<scalar_t>* alpha,
                  const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* std,
                  const scalar_t* noise, scalar_t* out, int64_t rows, int64_t D, uint64_t seed,
                  uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> eps(noise == nullptr ? D : 0);
    for (int64_t r = begin; r < end; ++r) {
      const opmath_t a = alpha[r];
      const opmath_t keep = std::sqrt(a), drop = std::sqrt(opmath_t(1) - a);
      const scalar_t* xr = x + r * D;
      scalar_t* zr = out + r * D;
      if (noise == nullptr) {
        fill_gate_noise(eps.data(), seed, offset, r * D, D);
        for (int64_t d = 0; d < D; ++d) {
          const opmath_t m = mean[d];
          zr[d] = static_cast<scalar_t>(m + keep * (static_cast<opmath_t>(xr[d]) - m) +
                                        drop * std[d] * static_cast<opmath_t>(eps[d]));
        }
      } else {
        const scalar_t* nr = noise + r * D;
        for (int64_t d = 0; d < D; ++d) {
          const opmath_t m = mean[d];
          zr[d] = static_cast<scalar_t>(m + keep * (static_cast<opmath_t>(xr[d]) - m) +
                                        drop * std[d] * static_cast<opmath_t>(nr[d]));
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad, const scalar_t* x, const at::opmath_type<scalar_t>* alpha,
                   const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* std,
                   const scalar_t* noise, scalar_t* grad_x, at::opmath_type<scalar_t>* grad_alpha,
                   int64_t rows, int64_t D, uint64_t seed, uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const opmath_t lo = static_cast<opmath_t>(kAlphaGradClamp);
  const opmath_t hi = opmath_t(1) - lo;
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> eps(grad_alpha != nullptr && noise == nullptr ? D : 0);
    for (int64_t r = begin; r < end; ++r) {
      const opmath_t a = alpha[r];
      const scalar_t* gr = grad + r * D;
      if (grad_x != nullptr) {
        const opmath_t keep = std::sqrt(a);
        scalar_t* dxr = grad_x + r * D;
        for (int64_t d = 0; d < D; ++d) dxr[d] = static_cast<scalar_t>(keep * static_cast<opmath_t>(gr[d]));
      }
      if (grad_alpha == nullptr) continue;
      const scalar_t* xr = x + r * D;
      acc_t signal = 0, noise_sum = 0;
      if (noise == nullptr) {
        fill_gate_noise(eps.data(), seed, offset, r * D, D);
        for (int64_t d = 0; d < D; ++d) {
          const opmath_t g = static_cast<opmath_t>(gr[d]);
          signal += g * (static_cast<opmath_t>(xr[d]) - mean[d]);
          noise_sum += g * std[d] * static_cast<opmath_t>(eps[d]);
        }
      } else {
        const scalar_t* nr = noise + r * D;
        for (int64_t d = 0; d < D; ++d) {
          const opmath_t g = static_cast<opmath_t>(gr[d]);
          signal += g * (static_cast<opmath_t>(xr[d]) - mean[d]);
          noise_sum += g * std[d] * static_cast<opmath_t>(nr[d]);
        }
      }
      const opmath_t a_c = std::min(std::max(a, lo), hi);
      grad_alpha[r] = static_cast<opmath_t>(signal / (2 * std::sqrt(a_c)) -
                                            noise_sum / (2 * std::sqrt(opmath_t(1) - a_c)));
    }
  });
}

at::Tensor noise_gate_forward_cpu(const at::Tensor& x, const at::Tensor& alpha,
                                  const at::Tensor& mean, const at::Tensor& std,
                                  const std::optional<at::Tensor>& noise, int64_t seed,
                                  int64_t offset) {
  check_noise_gate_inputs(x, alpha, mean, std, noise, seed, offset, c10::DeviceType::CPU,
                          "noise_gate_forward");
  at::Tensor out = at::empty_like(x);
  const int64_t D = x.size(-1);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_gate_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<opmath_t>(),
                           mean.const_data_ptr<opmath_t>(), std.const_data_ptr<opmath_t>(),
                           noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), x.numel() / D, D,
                           static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> noise_gate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& std, const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
    bool need_x_grad, bool need_alpha_grad) {
  check_noise_gate_inputs(x, alpha, mean, std, noise, seed, offset, c10::DeviceType::CPU,
                          "noise_gate_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "noise_gate_backward: grad must match x in shape, dtype and device");
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_x = need_x_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_alpha = need_alpha_grad ? at::empty_like(alpha) : at::empty({0}, alpha.options());
  const int64_t D = x.size(-1);
  if (x.numel() == 0) {
    if (need_alpha_grad) grad_alpha.zero_();
    return {grad_x, grad_alpha};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_gate_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            alpha.const_data_ptr<opmath_t>(), mean.const_data_ptr<opmath_t>(),
                            std.const_data_ptr<opmath_t>(),
                            noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr,
                            need_x_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                            need_alpha_grad ? grad_alpha.mutable_data_ptr<opmath_t>() : nullptr,
                            x.numel() / D, D, static_cast<uint64_t>(seed),
                            static_cast<uint64_t>(offset));
  });
  return {grad_x, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(autoselect_C, CPU, m) {
  m.impl("noise_gate_forward", &noise_gate_forward_cpu);
  m.impl("noise_gate_backward", &noise_gate_backward_cpu);
}

}  // namespace autoselect
