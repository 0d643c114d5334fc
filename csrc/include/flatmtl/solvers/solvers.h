// Every K x K solver, and the CUDA launcher that runs one in a single thread block.
// A solver is a small struct of parameters (pointers are host or device addresses, matching where it
// runs) with work_size(K) (scratch doubles) and operator()(M, K, w, work) -> Status.
#pragma once

#include <stdint.h>

#include <string>

#include "flatmtl/solvers/affinity_propagation.h"
#include "flatmtl/solvers/dual_cone.h"
#include "flatmtl/solvers/fairgrad.h"
#include "flatmtl/solvers/imtlg.h"
#include "flatmtl/solvers/mean_sum.h"
#include "flatmtl/solvers/mgda.h"
#include "flatmtl/solvers/nash_mtl.h"
#include "flatmtl/solvers/projection_loop.h"
#include "flatmtl/solvers/simplex.h"

namespace flatmtl::solvers {

// Largest K the bindings accept (K² indices stay far inside int range).
constexpr int64_t kMaxK = 4096;

namespace cuda {

// Runs problem(M, K, w, work) on `stream` as one thread block (M, w, work and every pointer inside
// `problem` are device addresses). status, when not null, receives {iterations, converged} (int32).
// Returns an empty string on success, else the CUDA error. Instantiated in csrc/cuda/solvers.cu.
template <class Problem>
std::string launch(const Problem& problem, const double* M, int K, double* w, double* work, int* status, int device,
                   uintptr_t stream);

}  // namespace cuda
}  // namespace flatmtl::solvers
