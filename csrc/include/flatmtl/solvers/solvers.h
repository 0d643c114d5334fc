// Every K x K solver, and the CUDA launcher that runs one in a single thread block.
// A solver is a small struct of parameters (pointers are host or device addresses, matching where it
// runs) with work_size(K) (scratch doubles) and operator()(M, K, w, work) -> Status.
#pragma once

#include <stdint.h>

#include <string>

#include "flatmtl/solvers/affinity_propagation.h"
#include "flatmtl/solvers/aligned_mtl.h"
#include "flatmtl/solvers/dual_cone.h"
#include "flatmtl/solvers/fairgrad.h"
#include "flatmtl/solvers/imtlg.h"
#include "flatmtl/solvers/mean_sum.h"
#include "flatmtl/solvers/mgda.h"
#include "flatmtl/solvers/nash_mtl.h"
#include "flatmtl/solvers/projection_loop.h"
#include "flatmtl/solvers/rows.h"
#include "flatmtl/solvers/simplex.h"

namespace flatmtl::solvers {

// Largest K the bindings accept (K² indices stay far inside int range).
constexpr int64_t kMaxK = 4096;

namespace cuda {

constexpr int kBlockThreads = 128;
// Largest K whose M the kernel stages in shared memory (64 x 64 doubles = 32 KB).
constexpr int kMaxStagedK = 64;
// Scratch a row-parallel solve may take for its workers' own scratch (doubles, 128 MB): at large K
// fewer workers share the tasks.
constexpr int64_t kLaneBudget = int64_t(1) << 24;

// The workers of a row-parallel solve on the GPU: one per task, at most a block, within kLaneBudget.
template <class Problem>
inline int row_lanes(int K) {
  const int64_t affordable = kLaneBudget / (Problem::row_work_size(K) > 0 ? Problem::row_work_size(K) : 1);
  return int(max2(1.0, min2(min2(double(K), double(kBlockThreads)), double(affordable))));
}

// Scratch doubles of the solver itself on the GPU for K tasks.
template <class Problem>
inline int64_t solver_work_size(int K) {
  if constexpr (is_row_parallel<Problem>) return rows_work_size<Problem>(K, row_lanes<Problem>(K));
  return Problem::work_size(K);
}

// Scratch doubles of launch() for K tasks: the solver's, then, where M is not staged, the K x K zeros that
// stand in for a non-finite M (nan_if_nonfinite).
template <class Problem>
inline int64_t work_size(int K) {
  return solver_work_size<Problem>(K) + (K > kMaxStagedK ? int64_t(K) * K : 0);
}

// Runs the solve on `stream` as one thread block of kBlockThreads: a row-parallel problem (rows.h) spreads
// its tasks over row_lanes(K) threads, a team solver (team.h) runs on all of them, any other runs
// problem(M, K, w, work) in thread 0. M, w, work
// (work_size(K) doubles) and every pointer inside `problem` are device addresses. status, when not null,
// receives {iterations, converged} (int32). nan_if_nonfinite applies common.h's non-finite policy. Returns an
// empty string on success, else the CUDA error. Instantiated in csrc/cuda/solvers.cu.
template <class Problem>
std::string launch(const Problem& problem, const double* M, int K, double* w, double* work, int* status,
                   bool nan_if_nonfinite, int device, uintptr_t stream);

}  // namespace cuda
}  // namespace flatmtl::solvers
