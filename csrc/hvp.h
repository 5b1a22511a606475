// Fused Hessian-vector products for sequential networks (Pearlmutter's R-operator).
//
// Shared declarations of the engine::hvp_sequential sweep (hvp_sweep.cpp, device-generic ATen code
// registered for CPU in hvp_cpu.cpp and for CUDA in cuda/hvp_cuda.cu) and of the CPU-only NHWC
// helpers of its im2col + GEMM path (hvp_cpu.cpp).
//
// Pair layout: a primal activation a (B, ...) and its tangent R{a} (B, ...) are stored stacked as
// one (2B, ...) tensor [a; R{a}], so that forward and R-forward (and backward and R-backward) run
// as one GEMM / convolution over the concatenated batch. When R{a} is known to be zero (before the
// first parametrised layer) only the primal (B, ...) is stored ("r_zero").
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace engine_hvp {

// Layer kinds of the int spec and the number of ints that follow each kind.
enum LayerKind : int64_t {
  kNormalize = 1,  // buffers: mean (C), std (C)
  kLinear = 2,     // ints: has_bias; params: weight (O, F) [, bias (O)]
  kConv2d = 3,     // ints: has_bias, sh, sw, ph, pw, dh, dw; params: weight (O, C, kh, kw) [, bias]
  kReLU = 4,       // -
  kMaxPool2d = 5,  // ints: kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode
  kAvgPool2d = 6,  // ints: kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override (0 = none)
  kFlatten = 7,    // - (start_dim 1, end_dim -1)
  kBatchNorm = 8,  // ints: affine; buffers: running_mean (C), inv_std (C); params: weight, bias if affine
};

// Algorithm of the sweep; kAlgoAuto picks kAlgoNhwc on CPU and kAlgoAten on CUDA.
//   kAlgoAten: NCHW activations, ATen convolutions and pooling (cuDNN / oneDNN), any device;
//   kAlgoGemm: CPU, NHWC activations, convolutions as explicit im2col + GEMM (MKL), NHWC kernels;
//   kAlgoNhwc: CPU, NHWC activations, ATen (oneDNN) convolutions on channels-last views, NHWC kernels.
enum Algo : int64_t { kAlgoAuto = 0, kAlgoAten = 1, kAlgoGemm = 2, kAlgoNhwc = 3 };

// engine::hvp_sequential: one forward + R-forward + backward + R-backward sweep. The loss is the
// weighted softmax cross-entropy of (y, weights), or, when logit_grad / logit_hess are given, any loss
// given by its gradient (B, K) and Hessian blocks (G, m K, m K) over groups of m consecutive rows at the
// network's logits (then y is not read and the returned loss is 0).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> hvp_sequential(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weights, at::TensorList params,
    at::TensorList tangents, at::TensorList buffers, at::IntArrayRef spec, bool want_param_grads, bool want_mixed,
    int64_t algo, const std::optional<at::Tensor>& logit_grad, const std::optional<at::Tensor>& logit_hess);

// Floor-mode / ceil-mode output size of a pooling window, exactly as ATen's pooling_output_shape.
int64_t pooling_out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode);

// ---- scratch-buffer pool of the CPU sweep ------------------------------------------------------------
// Large intermediates of the CPU sweep come from a thread-local pool of byte buffers that outlives
// the call (like the CUDA caching allocator): on CPU, first-touch page faults of fresh large
// allocations cost more than the arithmetic done on them. A buffer is handed out again once released
// (within the call when its activation is dead, or at the end of the call). Buffers not used by a
// call are freed at its end, so the pool holds at most the working set of the last call.
class Workspace {
 public:
  // Uninitialised contiguous tensor of `sizes` carved from a free pool buffer (best fit) or a new one.
  at::Tensor get(at::IntArrayRef sizes, const at::TensorOptions& opts);
  // Return the buffer holding t's storage to the pool (no-op for tensors that are not pool buffers).
  void release(const at::Tensor& t);
  // End of a call: every buffer is free again; buffers this call did not use are freed.
  void end_call();
  // Free every buffer; returns the bytes freed.
  int64_t clear();
  int64_t bytes() const;

 private:
  struct Buf {
    at::Tensor bytes;
    bool used = false;
    bool touched = false;
  };
  std::vector<Buf> bufs_;
};
Workspace& cpu_workspace();  // the calling thread's pool
int64_t release_workspace();  // frees the calling thread's pool, returns the bytes freed

// ---- CPU helpers of the NHWC im2col + GEMM path (hvp_cpu.cpp) ----------------------------------

// a: (N, H, W, C) contiguous -> cols (N*Ho*Wo, kh*kw*C) written to `cols`, column index (i*kw + j)*C + c.
void im2col_nhwc(const at::Tensor& a, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                 int64_t dw, int64_t Ho, int64_t Wo, at::Tensor& cols);
// Adjoint of im2col_nhwc: cols (N*Ho*Wo, kh*kw*C) -> out (N, H, W, C) (overwritten).
void col2im_nhwc(const at::Tensor& cols, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                 int64_t dh, int64_t dw, int64_t Ho, int64_t Wo, at::Tensor& out);
// Max pooling of an NHWC pair: argmax over the primal rows [0, B), tangent rows gathered at the argmax.
// a: (B or 2B, H, W, C) -> out (same N, Ho, Wo, C), index (B, Ho, Wo, C) int64 of hi*W + wi.
void maxpool_pair_nhwc(const at::Tensor& a, int64_t B, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t dh, int64_t dw, at::Tensor& out, at::Tensor& index);
// Backward of maxpool_pair_nhwc for a full pair gradient g (2B, Ho, Wo, C) -> out (2B, H, W, C) (overwritten).
void maxpool_pair_nhwc_backward(const at::Tensor& g, const at::Tensor& index, at::Tensor& out);
// Average pooling (ATen semantics: count_include_pad, divisor_override <= 0 = none) of
// (N, H, W, C) -> out (N, Ho, Wo, C), and its adjoint (out (N, H, W, C) overwritten).
void avgpool_nhwc(const at::Tensor& a, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                  bool count_include_pad, int64_t divisor_override, at::Tensor& out);
void avgpool_nhwc_backward(const at::Tensor& g, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           bool count_include_pad, int64_t divisor_override, at::Tensor& out);
// Column sums of the two halves of a pair matrix g (2M, O): (sum_rows g[:M], sum_rows g[M:]), accumulated in double.
std::tuple<at::Tensor, at::Tensor> colsum_pair(const at::Tensor& g, int64_t M);
// Eval-mode BatchNorm of a channels-last pair a (B or 2B, ..., C) with per-channel mean, inv_std and optional
// affine parameters gamma, beta and their tangents vg, vb (undefined tensors when not affine) -> out (2B, ..., C).
void batchnorm_pair_nhwc(const at::Tensor& a, int64_t B, const at::Tensor& mean, const at::Tensor& inv_std,
                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& vg, const at::Tensor& vb,
                         at::Tensor& out);
// Its backward for the pair gradient g (2B, ..., C): input gradient pair into gi (if defined) and, when
// `params`, the per-channel sums (g . ahat, g, R{g} . ahat + g . R{a} inv_std, R{g}) = (dgamma, dbeta, R dgamma, R dbeta).
std::vector<at::Tensor> batchnorm_pair_nhwc_backward(const at::Tensor& g, const at::Tensor& a, int64_t B,
                                                     const at::Tensor& mean, const at::Tensor& inv_std,
                                                     const at::Tensor& gamma, const at::Tensor& vg, bool params,
                                                     at::Tensor* gi);

}  // namespace engine_hvp
