// Counter-based Gaussian noise shared by the C++ and CUDA kernels.
//
// The RNG contract (DESIGN.md section 2): the noise for flat element i of a call with (seed, offset)
// is component i % 4 of Triton's `tl.randn4x(seed, offset + i // 4)`. This header is that function,
// written once for the host and the device:
//   counter c = offset + i // 4 (64 bit): Philox4x32-10 state (lo32(c), hi32(c), 0, 0),
//   key (lo32(seed), hi32(seed)); each 32-bit output -> int32 -> (x < 0 ? ~x : x) * 4.6566127342e-10f
//   (a uniform in [0, 1)); pairs (u0, u1) and (u2, u3) -> Box-Muller with u0, u2 clamped to 1e-7.
// Triton evaluates log/sin/cos with the device's own math library, so backends agree up to float
// rounding, not bit for bit.
#pragma once

#include <cstdint>
#include <cmath>

#include "device_macros.h"

namespace autoselect {

struct Normal4 {
  float v[4];
};

AUTOSELECT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds, the round function of triton/language/random.py (philox_impl).
AUTOSELECT_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, old_c0) ^ c3 ^ k1;
    c1 = kRoundB * old_c2;
    c3 = kRoundA * old_c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// Triton's uint_to_uniform_float for 32-bit inputs.
AUTOSELECT_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal (Box-Muller).
AUTOSELECT_HD void uniform_pair_to_normal(float u0, float u1, float& n0, float& n1) {
  u0 = u0 > 1.0e-7f ? u0 : 1.0e-7f;
  const float theta = 6.283185307179586f * u1;
  const float radius = sqrtf(-2.0f * logf(u0));
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(theta, &s, &c);
#else
  s = std::sin(theta);
  c = std::cos(theta);
#endif
  n0 = radius * c;
  n1 = radius * s;
}

// The four normals of counter `counter` under `seed`: tl.randn4x(seed, counter).
AUTOSELECT_HD Normal4 randn4x(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  Normal4 out;
  uniform_pair_to_normal(uint_to_uniform(c0), uint_to_uniform(c1), out.v[0], out.v[1]);
  uniform_pair_to_normal(uint_to_uniform(c2), uint_to_uniform(c3), out.v[2], out.v[3]);
  return out;
}

// The noise of one flat element i: component i % 4 of randn4x(seed, offset + i / 4).
AUTOSELECT_HD float gate_noise(uint64_t seed, uint64_t offset, uint64_t i) {
  return randn4x(seed, offset + (i >> 2)).v[i & 3];
}

}  // namespace autoselect
