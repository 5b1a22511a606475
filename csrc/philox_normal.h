// Keyed Gaussian noise: Philox4x32-10 + an exactly-rounded Box-Muller.
// The definition lives in engine/noise.py (the plain-PyTorch reference); this header must give
// the same bits. Only IEEE-exact float32 operations are used; compile without FMA contraction
// (-ffp-contract=off / nvcc -fmad=false) so that every multiply and add rounds on its own.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define ENGINE_HD __host__ __device__ __forceinline__
#else
#define ENGINE_HD inline
#endif

namespace engine_noise {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

ENGINE_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

ENGINE_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

ENGINE_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// Coefficients: engine/noise.py LOG_COEFFS, SIN_COEFFS, COS_COEFFS (float32, lowest degree first).
ENGINE_HD float poly_log(float f) {
  float a = -0.07434117794036865f;
  a = a * f + 0.12796849012374878f;
  a = a * f + -0.13268345594406128f;
  a = a * f + 0.1420142948627472f;
  a = a * f + -0.1660829782485962f;
  a = a * f + 0.200008362531662f;
  a = a * f + -0.2500157952308655f;
  a = a * f + 0.33333346247673035f;
  a = a * f + -0.49999988079071045f;
  a = a * f + 1.0f;
  return a;
}

ENGINE_HD float poly_sin(float s) {
  float a = 3.0897433589416323e-07f;
  a = a * s + -3.6572346289176494e-05f;
  a = a * s + 0.002490393118932843f;
  a = a * s + -0.08074551075696945f;
  a = a * s + 0.7853981852531433f;
  return a;
}

ENGINE_HD float poly_cos(float s) {
  float a = -2.4263625775233777e-08f;
  a = a * s + 3.590463165892288e-06f;
  a = a * s + -0.0003259916848037392f;
  a = a * s + 0.01585434377193451f;
  a = a * s + -0.3084251284599304f;
  a = a * s + 1.0f;
  return a;
}

// Two standard normals from two uint32 words (see engine/noise.py for the derivation).
ENGINE_HD void box_muller(uint32_t wa, uint32_t wb, float& z_cos, float& z_sin) {
  const int32_t a = static_cast<int32_t>(wa >> 8) + 1;  // [1, 2^24]
  const uint32_t bits = float_to_bits(static_cast<float>(a));
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bits_to_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool big = m >= 1.4142135381698608f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float f = m - 1.0f;
  const float ln_u1 = f * poly_log(f) + static_cast<float>(e - 24) * 0.6931471824645996f;
  const float arg = ln_u1 * -2.0f;
  const float r = std::sqrt(arg > 0.0f ? arg : 0.0f);

  const int32_t b = static_cast<int32_t>(wb >> 8);  // [0, 2^24)
  const int32_t k = (b + (1 << 21)) >> 22;
  const float t = static_cast<float>(b - (k << 22)) * 4.76837158203125e-07f;  // 2^-21
  const float s = t * t;
  const float sn = t * poly_sin(s);
  const float cs = poly_cos(s);
  const int32_t q = k & 3;
  const float c = q == 0 ? cs : (q == 1 ? -sn : (q == 2 ? -cs : sn));
  const float d = q == 0 ? sn : (q == 1 ? cs : (q == 2 ? -sn : -cs));
  z_cos = r * c;
  z_sin = r * d;
}

}  // namespace engine_noise
