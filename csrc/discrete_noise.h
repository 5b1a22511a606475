// Keyed discrete (sound) noise on the 8-bit grid: Philox4x32-10 words -> 64-bit uniform -> integer
// step k by exact comparison with a uint64 threshold table. The definition lives in engine/noise.py
// (noise="discrete", the plain-PyTorch reference _discrete_steps_ref); this header gives the same
// integers. Only integer operations decide k; the pixel value float32(j) / 255.0f is one IEEE
// correctly rounded division (compile without fast-math).
#pragma once
#include <cstdint>

#include "philox_normal.h"

namespace engine_noise {

// Largest power of two <= len (0 for len == 0): the first step of count_le.
inline int64_t top_step(int64_t len) {
  if (len <= 0) return 0;
  int64_t step = 1;
  while (step * 2 <= len) step *= 2;
  return step;
}

// Number of entries of the non-decreasing table t[0..len) that are <= u (binary lifting:
// the first pos entries are all <= u throughout).
ENGINE_HD int64_t count_le(const uint64_t* t, int64_t len, int64_t top, uint64_t u) {
  int64_t pos = 0;
  for (int64_t step = top; step > 0; step >>= 1) {
    if (pos + step <= len && t[pos + step - 1] <= u) pos += step;
  }
  return pos;
}

// 64-bit uniforms of pixels 2g and 2g + 1 (Philox block (g, sample, image, stream)).
ENGINE_HD void discrete_uniform_pair(uint32_t g, uint32_t sample, uint32_t image, uint32_t stream, uint32_t k0,
                                     uint32_t k1, uint64_t& u_even, uint64_t& u_odd) {
  uint32_t c0 = g, c1 = sample, c2 = image, c3 = stream;
  philox4x32_10(c0, c1, c2, c3, k0, k1);
  u_even = (static_cast<uint64_t>(c0) << 32) | c1;
  u_odd = (static_cast<uint64_t>(c2) << 32) | c3;
}

}  // namespace engine_noise
