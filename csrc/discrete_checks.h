// Argument checks shared by the CPU and CUDA ops of the discrete noise (host code only).
#pragma once
#include <torch/extension.h>

namespace engine_noise {

inline void check_discrete_args(const at::Tensor& grid, const at::Tensor& row_image, const at::Tensor& row_sample,
                                const at::Tensor& image_ids, const at::Tensor& thresholds, int64_t stream,
                                at::ScalarType dtype) {
  TORCH_CHECK(grid.scalar_type() == at::kInt, "noisy_batch_discrete: grid must be int32, got ", grid.scalar_type());
  TORCH_CHECK(grid.dim() >= 1, "noisy_batch_discrete: grid must have shape (B, ...)");
  TORCH_CHECK(row_image.dim() == 1 && row_image.scalar_type() == at::kLong,
              "noisy_batch_discrete: row_image must be 1-D int64");
  TORCH_CHECK(row_sample.dim() == 1 && row_sample.scalar_type() == at::kLong,
              "noisy_batch_discrete: row_sample must be 1-D int64");
  TORCH_CHECK(image_ids.dim() == 1 && image_ids.scalar_type() == at::kLong,
              "noisy_batch_discrete: image_ids must be 1-D int64");
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.scalar_type() == at::kLong && thresholds.size(0) % 2 == 0,
              "noisy_batch_discrete: thresholds must be a 1-D int64 tensor of even length");
  TORCH_CHECK(row_image.size(0) == row_sample.size(0), "noisy_batch_discrete: row_image and row_sample differ in length (",
              row_image.size(0), " vs ", row_sample.size(0), ")");
  TORCH_CHECK(image_ids.size(0) == grid.size(0), "noisy_batch_discrete: image_ids has ", image_ids.size(0),
              " entries, grid has ", grid.size(0), " images");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, "noisy_batch_discrete: stream must be in [0, 2^32)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kInt,
              "noisy_batch_discrete: dtype must be float32, float16, bfloat16 or int32, got ", dtype);
  TORCH_CHECK(thresholds.size(0) / 2 < (1LL << 22), "noisy_batch_discrete: threshold table too long");
}

}  // namespace engine_noise
