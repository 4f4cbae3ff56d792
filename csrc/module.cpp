// The Python module tdiff._C. Importing it loads this shared library, whose static TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL blocks (one per op file in csrc/) register the tdiff::*_cpu kernels with the dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tdiff C++ CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
