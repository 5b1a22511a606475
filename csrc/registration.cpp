// Operator schemas of the engine extension (one TORCH_LIBRARY block for the namespace) and the
// Python module init that makes `import engine._C` load the library and run the registrations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "engine C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace engine_hvp {
int64_t release_workspace();  // csrc/hvp_cpu.cpp
}
namespace engine_conv_pool {
std::string cpu_isa(bool supported);  // csrc/conv_pool_cpu.cpp
}

TORCH_LIBRARY(engine, m) {
  // Noisy forward batch: out[r] = dtype(x[row_image[r]] + sigma * z(seed, image_ids[row_image[r]], row_sample[r], stream)).
  m.def("noisy_batch(Tensor x, Tensor row_image, Tensor row_sample, Tensor image_ids, int seed, int stream, float sigma, "
        "ScalarType dtype) -> Tensor");
  // Discrete (sound) noise on the 8-bit grid (csrc/discrete_noise.h): out[r] = dtype(float32(j) / 255) (int32: j), j =
  // grid[row_image[r]] + k, k = #{thresholds <= u} - len/2, u the 64-bit keyed uniform of the pixel (engine/noise.py).
  m.def("noisy_batch_discrete(Tensor grid, Tensor row_image, Tensor row_sample, Tensor image_ids, Tensor thresholds, "
        "int seed, int stream, ScalarType dtype) -> Tensor");
  // CPU certification's convolution stages, fused per sample (csrc/conv_pool_cpu.cpp): relu(maxpool2x2(conv2d((x - mean)
  // / std, weight, bias))) for x (B, C, H, W), weight (O, C, kh, kw) -> (B, O, Hp, Wp) channels-last.
  m.def("conv_pool_relu(Tensor x, Tensor weight, Tensor bias, float mean, float std) -> Tensor");
  // The variant of conv_pool_relu in effect ("avx512", "avx2" or "generic", after ENGINE_CPU_ISA), or with
  // supported=True the best one this CPU can run.
  m.def("cpu_isa(bool supported=False) -> str", &engine_conv_pool::cpu_isa);
  // Fused Hessian-vector products (csrc/hvp*.{h,cpp}, csrc/cuda/hvp_cuda.cu). Pairs are stacked (2B, ...) = [a; R{a}].
  // ReLU of a pair in place: [z; R{z}] -> [relu(z); (z > 0) * R{z}].
  m.def("relu_rop_(Tensor(a!) pair) -> ()");
  // Masks both halves of grad_pair (2B, ...) in place with out_primal (B, ...) > 0.
  m.def("relu_rop_backward_(Tensor out_primal, Tensor(a!) grad_pair) -> ()");
  // Loss (1/B) sum_i w_i CE(z_i, y_i) of the primal logits, and the pair [dL/dz; R{dL/dz}] (2B, classes).
  m.def("softmax_xent_rop(Tensor logits_pair, Tensor y, Tensor? weights) -> (Tensor, Tensor)");
  // Loss, gradient, H v and mixed term d/dx (grad_w L . v) of a sequential network (layer spec: csrc/hvp.h);
  // the loss is the softmax cross-entropy, or the one given by logit_grad / logit_hess (csrc/hvp.h).
  m.def("hvp_sequential(Tensor x, Tensor y, Tensor? weights, Tensor[] params, Tensor[] tangents, Tensor[] buffers, "
        "int[] spec, bool want_param_grads, bool want_mixed, int algo, Tensor? logit_grad=None, "
        "Tensor? logit_hess=None) -> (Tensor, Tensor[], Tensor[], Tensor)");
  // Frees the calling thread's pool of CPU scratch buffers of hvp_sequential; returns the bytes freed.
  m.def("hvp_release_workspace() -> int", &engine_hvp::release_workspace);
}
