// The Python module grokalign_fast._C: empty; importing it loads the shared
// library, whose static initialisers register the operators with the
// dispatcher (torch.ops.grokalign.*). Not part of the libtorch (CMake) build.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "grokalign_fast native operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
