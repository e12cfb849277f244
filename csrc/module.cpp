// aim_kernels._C: a plain shared library. Importing it runs the TORCH_LIBRARY_IMPL
// registrations of csrc/cpu and csrc/cuda; the op schemas live in aim_kernels/_library.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // WITH_CUDA: whether csrc/cuda was compiled in, which tests and backends() check
  // independently of which kernel currently serves the CUDA dispatch key.
#ifdef AIM_KERNELS_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  if (PyModule_AddObjectRef(module, "WITH_CUDA", with_cuda ? Py_True : Py_False) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
