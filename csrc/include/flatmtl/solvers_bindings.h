// Registers the K x K solvers (csrc/solvers_bindings.cpp) on the _C module.
#pragma once

#include <pybind11/pybind11.h>

namespace flatmtl {
void bind_solvers(pybind11::module_& m);
}
