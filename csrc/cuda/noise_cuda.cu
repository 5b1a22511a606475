// CUDA implementation of engine::noisy_batch (same bits as engine.noise.noisy_batch_ref).
// Built with -fmad=false so that no multiply-add is contracted. One thread per Philox block
// (4 pixels) of one row.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "../philox_normal.h"
#include "../discrete_noise.h"
#include "../discrete_checks.h"

namespace {

template <typename out_t>
__global__ void noisy_batch_kernel(const float* __restrict__ x, int64_t num_pixels, int64_t groups,
                                   const int64_t* __restrict__ row_image, const int64_t* __restrict__ row_sample,
                                   const int64_t* __restrict__ image_ids, uint32_t k0, uint32_t k1, uint32_t stream,
                                   float sigma, out_t* __restrict__ out, int64_t rows) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= rows * groups) return;
  const int64_t r = tid / groups;
  const int64_t g = tid - r * groups;
  const int64_t slot = row_image[r];
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(row_sample[r]);
  uint32_t c2 = static_cast<uint32_t>(image_ids[slot]), c3 = stream;
  engine_noise::philox4x32_10(c0, c1, c2, c3, k0, k1);
  float z[4];
  engine_noise::box_muller(c0, c1, z[0], z[1]);
  engine_noise::box_muller(c2, c3, z[2], z[3]);
  const float* src = x + slot * num_pixels;
  out_t* dst = out + r * num_pixels;
  const int64_t p0 = g * 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t p = p0 + j;
    if (p < num_pixels) {
      const float scaled = __fmul_rn(sigma, z[j]);
      dst[p] = static_cast<out_t>(__fadd_rn(src[p], scaled));
    }
  }
}

at::Tensor noisy_batch_cuda(const at::Tensor& x, const at::Tensor& row_image, const at::Tensor& row_sample,
                            const at::Tensor& image_ids, int64_t seed, int64_t stream, double sigma,
                            at::ScalarType dtype) {
  TORCH_CHECK(x.is_cuda() && row_image.is_cuda() && row_sample.is_cuda() && image_ids.is_cuda(),
              "noisy_batch: all tensors must be on the same CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "noisy_batch: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "noisy_batch: x must have shape (B, ...)");
  TORCH_CHECK(row_image.dim() == 1 && row_image.scalar_type() == at::kLong, "noisy_batch: row_image must be 1-D int64");
  TORCH_CHECK(row_sample.dim() == 1 && row_sample.scalar_type() == at::kLong, "noisy_batch: row_sample must be 1-D int64");
  TORCH_CHECK(image_ids.dim() == 1 && image_ids.scalar_type() == at::kLong, "noisy_batch: image_ids must be 1-D int64");
  TORCH_CHECK(row_image.size(0) == row_sample.size(0), "noisy_batch: row_image and row_sample differ in length");
  TORCH_CHECK(image_ids.size(0) == x.size(0), "noisy_batch: image_ids must have one entry per image");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, "noisy_batch: stream must be in [0, 2^32)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "noisy_batch: dtype must be float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), rows = row_image.size(0);
  auto xc = x.contiguous();
  auto ri = row_image.contiguous(), rs = row_sample.contiguous(), ids = image_ids.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = rows;
  auto out = at::empty(shape, x.options().dtype(dtype));
  const int64_t num_pixels = batch > 0 ? xc.numel() / batch : 0;
  if (rows == 0 || num_pixels == 0) return out;
  const int64_t groups = (num_pixels + 3) / 4;
  const int64_t total = rows * groups;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const uint64_t useed = static_cast<uint64_t>(seed);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "noisy_batch_cuda", [&] {
    noisy_batch_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, cuda_stream>>>(
        xc.data_ptr<float>(), num_pixels, groups, ri.data_ptr<int64_t>(), rs.data_ptr<int64_t>(),
        ids.data_ptr<int64_t>(), static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
        static_cast<uint32_t>(stream), static_cast<float>(sigma), out.data_ptr<scalar_t>(), rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// engine::noisy_batch_discrete (same integers and bits as engine.noise.noisy_batch_ref(..., noise="discrete")).
// One thread per Philox block (2 pixels) of one row; the threshold table is read from global memory.
template <typename out_t>
__device__ __forceinline__ out_t discrete_value(int32_t j) {
  if constexpr (std::is_same_v<out_t, int32_t>) {
    return j;
  } else {
    return static_cast<out_t>(__fdiv_rn(static_cast<float>(j), 255.0f));  // correctly rounded quotient
  }
}

template <typename out_t>
__global__ void noisy_batch_discrete_kernel(const int32_t* __restrict__ grid, int64_t num_pixels, int64_t pairs,
                                            const int64_t* __restrict__ row_image,
                                            const int64_t* __restrict__ row_sample,
                                            const int64_t* __restrict__ image_ids, const uint64_t* __restrict__ table,
                                            int64_t len, int64_t top, uint32_t k0, uint32_t k1, uint32_t stream,
                                            out_t* __restrict__ out, int64_t rows) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= rows * pairs) return;
  const int64_t r = tid / pairs;
  const int64_t g = tid - r * pairs;
  const int64_t slot = row_image[r];
  uint64_t u[2];
  engine_noise::discrete_uniform_pair(static_cast<uint32_t>(g), static_cast<uint32_t>(row_sample[r]),
                                      static_cast<uint32_t>(image_ids[slot]), stream, k0, k1, u[0], u[1]);
  const int32_t* src = grid + slot * num_pixels;
  out_t* dst = out + r * num_pixels;
  const int64_t half = len / 2;
#pragma unroll
  for (int l = 0; l < 2; ++l) {
    const int64_t p = 2 * g + l;
    if (p < num_pixels) {
      const int64_t k = engine_noise::count_le(table, len, top, u[l]) - half;
      dst[p] = discrete_value<out_t>(src[p] + static_cast<int32_t>(k));
    }
  }
}

at::Tensor noisy_batch_discrete_cuda(const at::Tensor& grid, const at::Tensor& row_image, const at::Tensor& row_sample,
                                     const at::Tensor& image_ids, const at::Tensor& thresholds, int64_t seed,
                                     int64_t stream, at::ScalarType dtype) {
  TORCH_CHECK(grid.is_cuda() && row_image.is_cuda() && row_sample.is_cuda() && image_ids.is_cuda() && thresholds.is_cuda(),
              "noisy_batch_discrete: all tensors must be on the same CUDA device");
  engine_noise::check_discrete_args(grid, row_image, row_sample, image_ids, thresholds, stream, dtype);
  const c10::cuda::CUDAGuard guard(grid.device());
  const int64_t batch = grid.size(0), rows = row_image.size(0), len = thresholds.size(0);
  auto gc = grid.contiguous();
  auto ri = row_image.contiguous(), rs = row_sample.contiguous(), ids = image_ids.contiguous();
  auto tc = thresholds.contiguous();
  std::vector<int64_t> shape(grid.sizes().begin(), grid.sizes().end());
  shape[0] = rows;
  auto out = at::empty(shape, grid.options().dtype(dtype));
  const int64_t num_pixels = batch > 0 ? gc.numel() / batch : 0;
  if (rows == 0 || num_pixels == 0) return out;
  const int64_t pairs = (num_pixels + 1) / 2;
  const int64_t total = rows * pairs;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const uint64_t useed = static_cast<uint64_t>(seed);
  const auto* table = reinterpret_cast<const uint64_t*>(tc.data_ptr<int64_t>());
  const int64_t top = engine_noise::top_step(len);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* op) {
    using out_t = std::remove_pointer_t<decltype(op)>;
    noisy_batch_discrete_kernel<out_t><<<static_cast<unsigned>(blocks), threads, 0, cuda_stream>>>(
        gc.data_ptr<int32_t>(), num_pixels, pairs, ri.data_ptr<int64_t>(), rs.data_ptr<int64_t>(),
        ids.data_ptr<int64_t>(), table, len, top, static_cast<uint32_t>(useed), static_cast<uint32_t>(useed >> 32),
        static_cast<uint32_t>(stream), op, rows);
  };
  if (dtype == at::kFloat) {
    launch(out.data_ptr<float>());
  } else if (dtype == at::kHalf) {
    launch(out.data_ptr<at::Half>());
  } else if (dtype == at::kBFloat16) {
    launch(out.data_ptr<at::BFloat16>());
  } else {
    launch(out.data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("noisy_batch", &noisy_batch_cuda);
  m.impl("noisy_batch_discrete", &noisy_batch_discrete_cuda);
}
