// CPU implementation of engine::noisy_batch_discrete: replicate grid images (int32 indices
// round(255 x)), add the keyed integer steps k and write dtype(float32(j) / 255) (or j itself for
// int32). Same bits as engine.noise.noisy_batch_ref(..., noise="discrete").
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "discrete_noise.h"
#include "discrete_checks.h"

namespace {

template <typename out_t>
inline out_t grid_value(int32_t j) {
  if constexpr (std::is_same_v<out_t, int32_t>) {
    return j;
  } else {
    const float v = static_cast<float>(j) / 255.0f;  // IEEE division, correctly rounded
    return static_cast<out_t>(v);
  }
}

template <typename out_t>
void discrete_rows(const int32_t* grid, int64_t num_pixels, const int64_t* row_image, const int64_t* row_sample,
                   const int64_t* image_ids, const uint64_t* table, int64_t len, uint64_t seed, uint32_t stream,
                   out_t* out, int64_t row_begin, int64_t row_end) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t half = len / 2;
  const int64_t top = engine_noise::top_step(len);
  const int64_t pairs = (num_pixels + 1) / 2;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t slot = row_image[r];
    const int32_t* src = grid + slot * num_pixels;
    out_t* dst = out + r * num_pixels;
    const uint32_t sample = static_cast<uint32_t>(row_sample[r]);
    const uint32_t image = static_cast<uint32_t>(image_ids[slot]);
    for (int64_t g = 0; g < pairs; ++g) {
      uint64_t u[2];
      engine_noise::discrete_uniform_pair(static_cast<uint32_t>(g), sample, image, stream, k0, k1, u[0], u[1]);
      for (int64_t l = 0; l < 2; ++l) {
        const int64_t p = 2 * g + l;
        if (p >= num_pixels) break;
        const int64_t k = engine_noise::count_le(table, len, top, u[l]) - half;
        dst[p] = grid_value<out_t>(src[p] + static_cast<int32_t>(k));
      }
    }
  }
}

at::Tensor noisy_batch_discrete_cpu(const at::Tensor& grid, const at::Tensor& row_image, const at::Tensor& row_sample,
                                    const at::Tensor& image_ids, const at::Tensor& thresholds, int64_t seed,
                                    int64_t stream, at::ScalarType dtype) {
  engine_noise::check_discrete_args(grid, row_image, row_sample, image_ids, thresholds, stream, dtype);
  const int64_t batch = grid.size(0);
  const int64_t rows = row_image.size(0);
  const int64_t len = thresholds.size(0);
  if (rows > 0) {
    const auto lo = row_image.min().item<int64_t>(), hi = row_image.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < batch, "noisy_batch_discrete: row_image values must lie in [0, ", batch, "), got [", lo,
                ", ", hi, "]");
    const auto smin = row_sample.min().item<int64_t>(), smax = row_sample.max().item<int64_t>();
    TORCH_CHECK(smin >= 0 && smax <= 0xFFFFFFFFLL, "noisy_batch_discrete: row_sample values must lie in [0, 2^32)");
  }
  if (batch > 0) {
    const auto imin = image_ids.min().item<int64_t>(), imax = image_ids.max().item<int64_t>();
    TORCH_CHECK(imin >= 0 && imax <= 0xFFFFFFFFLL, "noisy_batch_discrete: image_ids values must lie in [0, 2^32)");
  }
  auto gc = grid.contiguous();
  auto ri = row_image.contiguous(), rs = row_sample.contiguous(), ids = image_ids.contiguous();
  auto tc = thresholds.contiguous();
  std::vector<int64_t> shape(grid.sizes().begin(), grid.sizes().end());
  shape[0] = rows;
  auto out = at::empty(shape, grid.options().dtype(dtype));
  const int64_t num_pixels = batch > 0 ? gc.numel() / batch : 0;
  if (rows == 0 || num_pixels == 0) return out;
  const uint64_t useed = static_cast<uint64_t>(seed);
  const auto* table = reinterpret_cast<const uint64_t*>(tc.data_ptr<int64_t>());
  const int64_t grain = std::max<int64_t>(1, 16384 / num_pixels);
  auto run = [&](auto* op) {
    using out_t = std::remove_pointer_t<decltype(op)>;
    const int32_t* gp = gc.data_ptr<int32_t>();
    const int64_t* rip = ri.data_ptr<int64_t>();
    const int64_t* rsp = rs.data_ptr<int64_t>();
    const int64_t* idp = ids.data_ptr<int64_t>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      discrete_rows<out_t>(gp, num_pixels, rip, rsp, idp, table, len, useed, static_cast<uint32_t>(stream), op, b, e);
    });
  };
  if (dtype == at::kFloat) {
    run(out.data_ptr<float>());
  } else if (dtype == at::kHalf) {
    run(out.data_ptr<at::Half>());
  } else if (dtype == at::kBFloat16) {
    run(out.data_ptr<at::BFloat16>());
  } else {
    run(out.data_ptr<int32_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) { m.impl("noisy_batch_discrete", &noisy_batch_discrete_cpu); }
