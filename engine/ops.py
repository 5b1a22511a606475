"""Python-side registrations for the ``torch.ops.engine`` operators of ``engine._C``.

Fake (meta) kernels let the ops run under FakeTensor / torch.compile and be checked with
``torch.library.opcheck``. Imported by :mod:`engine._ext` once the library has loaded.
"""

from __future__ import annotations

import torch

__all__: list[str] = []


@torch.library.register_fake("engine::noisy_batch")
def _noisy_batch_fake(x, row_image, row_sample, image_ids, seed, stream, sigma, dtype):
    torch._check(row_image.dim() == 1 and row_sample.dim() == 1, lambda: "row_image and row_sample must be 1-D")
    torch._check(row_image.shape[0] == row_sample.shape[0], lambda: "row_image and row_sample differ in length")
    torch._check(image_ids.shape[0] == x.shape[0], lambda: "image_ids must have one entry per image")
    return x.new_empty((row_image.shape[0],) + tuple(x.shape[1:]), dtype=dtype)


@torch.library.register_fake("engine::noisy_batch_discrete")
def _noisy_batch_discrete_fake(grid, row_image, row_sample, image_ids, thresholds, seed, stream, dtype):
    torch._check(row_image.dim() == 1 and row_sample.dim() == 1, lambda: "row_image and row_sample must be 1-D")
    torch._check(row_image.shape[0] == row_sample.shape[0], lambda: "row_image and row_sample differ in length")
    torch._check(image_ids.shape[0] == grid.shape[0], lambda: "image_ids must have one entry per image")
    return grid.new_empty((row_image.shape[0],) + tuple(grid.shape[1:]), dtype=dtype)


@torch.library.register_fake("engine::conv_pool_relu")
def _conv_pool_relu_fake(x, weight, bias, mean, std):
    torch._check(x.dim() == 4, lambda: "conv_pool_relu: x must be (B, C, H, W)")
    torch._check(weight.dim() == 4 and weight.shape[1] == x.shape[1], lambda: "conv_pool_relu: weight must be (O, C, kh, kw)")
    hp, wp = (x.shape[2] - weight.shape[2] + 1) // 2, (x.shape[3] - weight.shape[3] + 1) // 2
    return x.new_empty((x.shape[0], weight.shape[0], hp, wp)).contiguous(memory_format=torch.channels_last)


# -- fused Hessian-vector products (csrc/hvp_*.cpp, csrc/cuda/hvp_cuda.cu; see engine/hessian.py) --


@torch.library.register_fake("engine::relu_rop_")
def _relu_rop_fake(pair):
    torch._check(pair.dim() >= 1 and pair.shape[0] % 2 == 0, lambda: "relu_rop_: pair must be (2B, ...)")


@torch.library.register_fake("engine::relu_rop_backward_")
def _relu_rop_backward_fake(out_primal, grad_pair):
    torch._check(grad_pair.shape[0] == 2 * out_primal.shape[0], lambda: "relu_rop_backward_: grad_pair must be (2B, ...)")


@torch.library.register_fake("engine::softmax_xent_rop")
def _softmax_xent_rop_fake(logits_pair, y, weights):
    torch._check(logits_pair.dim() == 2 and logits_pair.shape[0] == 2 * y.shape[0],
                 lambda: "softmax_xent_rop: logits_pair must be (2B, classes)")
    return logits_pair.new_empty(()), torch.empty_like(logits_pair, memory_format=torch.contiguous_format)


@torch.library.register_fake("engine::hvp_sequential")
def _hvp_sequential_fake(x, y, weights, params, tangents, buffers, spec, want_param_grads, want_mixed, algo,
                         logit_grad=None, logit_hess=None):
    torch._check(len(params) == len(tangents), lambda: "hvp_sequential: one tangent per parameter")
    grads = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params] if want_param_grads else []
    hvs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params] if want_param_grads else []
    mixed = torch.empty_like(x, memory_format=torch.contiguous_format) if want_mixed else x.new_empty((0,))
    return x.new_empty(()), grads, hvs, mixed
