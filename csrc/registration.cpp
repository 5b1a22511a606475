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

TORCH_LIBRARY(engine, m) {
  // Noisy forward batch: out[r] = dtype(x[row_image[r]] + sigma * z(seed, image_ids[row_image[r]], row_sample[r], stream)).
  m.def("noisy_batch(Tensor x, Tensor row_image, Tensor row_sample, Tensor image_ids, int seed, int stream, float sigma, "
        "ScalarType dtype) -> Tensor");
}
