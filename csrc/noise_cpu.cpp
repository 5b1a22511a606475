// CPU implementation of engine::noisy_batch: replicate clean images, add sigma * keyed noise and
// cast, written straight into the forward batch. Same bits as engine.noise.noisy_batch_ref.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "philox_normal.h"

namespace {

constexpr int64_t kLanes = 16;  // Philox blocks per inner step (auto-vectorised)

template <typename out_t>
void noisy_rows(const float* x, int64_t num_pixels, const int64_t* row_image, const int64_t* row_sample,
                const int64_t* image_ids, uint64_t seed, uint32_t stream, float sigma, out_t* out,
                int64_t row_begin, int64_t row_end) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t groups = (num_pixels + 3) / 4;
  alignas(64) uint32_t w[4][kLanes];
  alignas(64) float z[kLanes * 4];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t slot = row_image[r];
    const float* src = x + slot * num_pixels;
    out_t* dst = out + r * num_pixels;
    const uint32_t sample = static_cast<uint32_t>(row_sample[r]);
    const uint32_t image = static_cast<uint32_t>(image_ids[slot]);
    for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        uint32_t c0 = static_cast<uint32_t>(g0 + l), c1 = sample, c2 = image, c3 = stream;
        engine_noise::philox4x32_10(c0, c1, c2, c3, k0, k1);
        w[0][l] = c0;
        w[1][l] = c1;
        w[2][l] = c2;
        w[3][l] = c3;
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        float a, b, c, d;
        engine_noise::box_muller(w[0][l], w[1][l], a, b);
        engine_noise::box_muller(w[2][l], w[3][l], c, d);
        z[4 * l + 0] = a;
        z[4 * l + 1] = b;
        z[4 * l + 2] = c;
        z[4 * l + 3] = d;
      }
      const int64_t p0 = g0 * 4;
      const int64_t p1 = std::min<int64_t>(num_pixels, p0 + kLanes * 4);
      for (int64_t p = p0; p < p1; ++p) {
        const float scaled = sigma * z[p - p0];
        dst[p] = static_cast<out_t>(src[p] + scaled);
      }
    }
  }
}

at::Tensor noisy_batch_cpu(const at::Tensor& x, const at::Tensor& row_image, const at::Tensor& row_sample,
                           const at::Tensor& image_ids, int64_t seed, int64_t stream, double sigma,
                           at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "noisy_batch: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "noisy_batch: x must have shape (B, ...)");
  TORCH_CHECK(row_image.dim() == 1 && row_image.scalar_type() == at::kLong, "noisy_batch: row_image must be 1-D int64");
  TORCH_CHECK(row_sample.dim() == 1 && row_sample.scalar_type() == at::kLong, "noisy_batch: row_sample must be 1-D int64");
  TORCH_CHECK(image_ids.dim() == 1 && image_ids.scalar_type() == at::kLong, "noisy_batch: image_ids must be 1-D int64");
  TORCH_CHECK(row_image.size(0) == row_sample.size(0), "noisy_batch: row_image and row_sample differ in length (",
              row_image.size(0), " vs ", row_sample.size(0), ")");
  TORCH_CHECK(image_ids.size(0) == x.size(0), "noisy_batch: image_ids has ", image_ids.size(0), " entries, x has ",
              x.size(0), " images");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, "noisy_batch: stream must be in [0, 2^32)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "noisy_batch: dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = x.size(0);
  const int64_t rows = row_image.size(0);
  if (rows > 0) {
    const auto lo = row_image.min().item<int64_t>(), hi = row_image.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < batch, "noisy_batch: row_image values must lie in [0, ", batch, "), got [", lo, ", ",
                hi, "]");
    const auto smin = row_sample.min().item<int64_t>(), smax = row_sample.max().item<int64_t>();
    TORCH_CHECK(smin >= 0 && smax <= 0xFFFFFFFFLL, "noisy_batch: row_sample values must lie in [0, 2^32)");
  }
  if (batch > 0) {
    const auto imin = image_ids.min().item<int64_t>(), imax = image_ids.max().item<int64_t>();
    TORCH_CHECK(imin >= 0 && imax <= 0xFFFFFFFFLL, "noisy_batch: image_ids values must lie in [0, 2^32)");
  }
  auto xc = x.contiguous();
  auto ri = row_image.contiguous(), rs = row_sample.contiguous(), ids = image_ids.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = rows;
  auto out = at::empty(shape, x.options().dtype(dtype));
  const int64_t num_pixels = batch > 0 ? xc.numel() / batch : (rows > 0 ? 0 : 0);
  if (rows == 0 || num_pixels == 0) return out;
  const uint64_t useed = static_cast<uint64_t>(seed);
  const float fsigma = static_cast<float>(sigma);
  const int64_t grain = std::max<int64_t>(1, 16384 / num_pixels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "noisy_batch_cpu", [&] {
    const float* xp = xc.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* rip = ri.data_ptr<int64_t>();
    const int64_t* rsp = rs.data_ptr<int64_t>();
    const int64_t* idp = ids.data_ptr<int64_t>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      noisy_rows<scalar_t>(xp, num_pixels, rip, rsp, idp, useed, static_cast<uint32_t>(stream), fsigma, op, b, e);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) { m.impl("noisy_batch", &noisy_batch_cpu); }
