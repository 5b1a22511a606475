// CUDA kernels of the fused Hessian-vector product (see ../hvp.h, ../hvp_sweep.cpp):
//   engine::relu_rop_, engine::relu_rop_backward_ - ReLU masks applied to both halves of a pair in
//   one pass; engine::softmax_xent_rop - loss, softmax gradient and its R-op, one warp per row;
// and the CUDA registration of engine::hvp_sequential (the device-generic sweep: cuBLAS / cuDNN
// through ATen for the GEMMs and convolutions, these kernels for the masks and the loss).
// Nothing here needs FMA contraction; the file builds with the extension's -fmad=false.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../hvp.h"

namespace engine_hvp {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(1) << 20)));  // grid-stride loops cover the rest
}

void check_pair_cuda(const at::Tensor& pair, const char* name) {
  TORCH_CHECK(pair.is_cuda(), name, ": expected a CUDA tensor");
  TORCH_CHECK(pair.dim() >= 1 && pair.size(0) % 2 == 0, name, ": expected a stacked pair (2B, ...), got ", pair.sizes());
  TORCH_CHECK(pair.scalar_type() == at::kFloat || pair.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", pair.scalar_type());
  TORCH_CHECK(pair.is_contiguous(), name, ": expected a contiguous tensor");
}

// ---- ReLU masks (in place) ----------------------------------------------------------------------

template <typename T>
__global__ void relu_rop_kernel(T* __restrict__ a, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const T v = a[i];
    const bool on = v > T(0);
    a[i] = (on || v != v) ? v : T(0);  // relu keeps NaN, like at::relu
    a[n + i] = on ? a[n + i] : T(0);
  }
}

template <typename T>
__global__ void relu_rop_backward_kernel(const T* __restrict__ mask, T* __restrict__ g, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    if (!(mask[i] > T(0))) {
      g[i] = T(0);
      g[n + i] = T(0);
    }
  }
}

void relu_rop_cuda_(at::Tensor& pair) {
  check_pair_cuda(pair, "relu_rop_");
  const c10::cuda::CUDAGuard guard(pair.device());
  const int64_t n = pair.numel() / 2;
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pair.scalar_type(), "relu_rop_cuda_", [&] {
    relu_rop_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream.stream()>>>(pair.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void relu_rop_backward_cuda_(const at::Tensor& out_primal, at::Tensor& grad_pair) {
  check_pair_cuda(grad_pair, "relu_rop_backward_");
  TORCH_CHECK(out_primal.is_cuda() && out_primal.device() == grad_pair.device(),
              "relu_rop_backward_: out_primal must be on grad_pair's device");
  TORCH_CHECK(out_primal.numel() * 2 == grad_pair.numel() && out_primal.size(0) * 2 == grad_pair.size(0),
              "relu_rop_backward_: out_primal ", out_primal.sizes(), " must be the first half of grad_pair ",
              grad_pair.sizes());
  TORCH_CHECK(out_primal.scalar_type() == grad_pair.scalar_type(), "relu_rop_backward_: dtypes differ");
  const c10::cuda::CUDAGuard guard(grad_pair.device());
  at::Tensor m = out_primal.contiguous();
  const int64_t n = m.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_pair.scalar_type(), "relu_rop_backward_cuda_", [&] {
    relu_rop_backward_kernel<scalar_t>
        <<<blocks_for(n), kThreads, 0, stream.stream()>>>(m.data_ptr<scalar_t>(), grad_pair.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- softmax cross-entropy and its R-op ---------------------------------------------------------

__device__ inline float dev_exp(float v) { return expf(v); }
__device__ inline double dev_exp(double v) { return exp(v); }
__device__ inline float dev_log(float v) { return logf(v); }
__device__ inline double dev_log(double v) { return log(v); }

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename A>
__device__ inline A warp_max(A v) {
  for (int off = 16; off > 0; off >>= 1) {
    const A o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

constexpr int kRowsPerBlock = 4;  // one warp per row

// z: (2B, K) = [logits; R{logits}]; G: (2B, K) = [dL/dz; R{dL/dz}]; row_loss: (B,) = coef * CE.
template <typename T, typename A>
__global__ void softmax_xent_rop_kernel(const T* __restrict__ z, const int64_t* __restrict__ y,
                                        const T* __restrict__ w, int64_t B, int64_t K, T* __restrict__ G,
                                        A* __restrict__ row_loss) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B) return;  // uniform within a warp
  const T* zr = z + row * K;
  const T* rzr = z + (B + row) * K;
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t k = lane; k < K; k += 32) {
    const A v = static_cast<A>(zr[k]);
    m = v > m ? v : m;
  }
  m = warp_max(m);
  A s = 0;
  for (int64_t k = lane; k < K; k += 32) s += dev_exp(static_cast<A>(zr[k]) - m);
  const A lse = m + dev_log(warp_sum(s));
  A dot = 0;
  for (int64_t k = lane; k < K; k += 32) dot += dev_exp(static_cast<A>(zr[k]) - lse) * static_cast<A>(rzr[k]);
  dot = warp_sum(dot);
  const A coef = (w != nullptr ? static_cast<A>(w[row]) : A(1)) / static_cast<A>(B);
  const int64_t label = y[row];
  T* gr = G + row * K;
  T* rgr = G + (B + row) * K;
  for (int64_t k = lane; k < K; k += 32) {
    const A p = dev_exp(static_cast<A>(zr[k]) - lse);
    gr[k] = static_cast<T>(coef * (p - (k == label ? A(1) : A(0))));
    rgr[k] = static_cast<T>(coef * p * (static_cast<A>(rzr[k]) - dot));
  }
  if (lane == 0) row_loss[row] = coef * (lse - static_cast<A>(zr[label]));
}

std::tuple<at::Tensor, at::Tensor> softmax_xent_rop_cuda(const at::Tensor& logits_pair, const at::Tensor& y,
                                                         const std::optional<at::Tensor>& weights) {
  check_pair_cuda(logits_pair.contiguous(), "softmax_xent_rop");
  TORCH_CHECK(logits_pair.dim() == 2, "softmax_xent_rop: logits_pair must be (2B, classes), got ", logits_pair.sizes());
  const int64_t B = logits_pair.size(0) / 2, K = logits_pair.size(1);
  TORCH_CHECK(K >= 1, "softmax_xent_rop: need at least one class");
  TORCH_CHECK(y.is_cuda() && y.device() == logits_pair.device() && y.dim() == 1 && y.size(0) == B &&
                  y.scalar_type() == at::kLong,
              "softmax_xent_rop: y must be int64 (", B, ",) on the logits' device");
  const c10::cuda::CUDAGuard guard(logits_pair.device());
  at::Tensor z = logits_pair.contiguous(), yc = y.contiguous(), w;
  if (weights.has_value()) {
    TORCH_CHECK(weights->device() == z.device() && weights->dim() == 1 && weights->size(0) == B &&
                    weights->scalar_type() == z.scalar_type(),
                "softmax_xent_rop: weights must be (", B, ",) with the logits' dtype and device");
    w = weights->contiguous();
  }
  if (B > 0) {  // labels are checked on the host (two small synchronisations per sweep)
    const int64_t lo = yc.min().item<int64_t>(), hi = yc.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "softmax_xent_rop: labels must lie in [0, ", K, "), got [", lo, ", ", hi, "]");
  }
  at::Tensor G = at::empty_like(z);
  at::Tensor loss;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_xent_rop_cuda", [&] {
    using acc_t = scalar_t;  // float rows in float, double rows in double
    at::Tensor row_loss = at::empty({B}, z.options());
    if (B > 0) {
      const int blocks = static_cast<int>((B + kRowsPerBlock - 1) / kRowsPerBlock);
      softmax_xent_rop_kernel<scalar_t, acc_t><<<blocks, kRowsPerBlock * 32, 0, stream.stream()>>>(
          z.data_ptr<scalar_t>(), yc.data_ptr<int64_t>(), w.defined() ? w.data_ptr<scalar_t>() : nullptr, B, K,
          G.data_ptr<scalar_t>(), row_loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    loss = row_loss.sum();
  });
  return {loss, G};
}

}  // namespace
}  // namespace engine_hvp

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("relu_rop_", &engine_hvp::relu_rop_cuda_);
  m.impl("relu_rop_backward_", &engine_hvp::relu_rop_backward_cuda_);
  m.impl("softmax_xent_rop", &engine_hvp::softmax_xent_rop_cuda);
  m.impl("hvp_sequential", &engine_hvp::hvp_sequential);  // device-generic sweep (kAlgoAten on CUDA)
}
