// The library's operators (schemas: op_schemas.h). The kernels are registered per device in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; fake kernels and autograd are registered from Python (fused_losses/_registrations.py).
#include "op_schemas.h"

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fused_losses._C loads this library, whose static initialisers register the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_losses, m) { fused_losses::define_operator_schemas(m); }
