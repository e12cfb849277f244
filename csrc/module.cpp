// aim_kernels._C: a plain shared library. Importing it runs the TORCH_LIBRARY_IMPL
// registrations of csrc/cpu and csrc/cuda; the op schemas live in aim_kernels/_library.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
