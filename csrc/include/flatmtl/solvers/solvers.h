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

// The solve as the CUDA kernel runs it on its block (csrc/cuda/solvers.cu), for any team: the CPU threads of
// thread_team.h run this very code, so the tests cover the kernel's staging and non-finite policy too.
// M is first copied into `staged` (K x K doubles; null: read in place). With nan_if_nonfinite it applies the
// aggregators' policy for an M holding a NaN or Inf (a non-finite G, aggregators/_fused.py): the solve runs on
// M = 0 instead (zeros in `staged`, else in `zeros`, K x K doubles), so it cannot fail or loop and the state it
// keeps moves as for M = 0, and every weight is then NaN. A row-parallel problem runs on the first `lanes`
// workers, a team solver on all, any other on worker 0. Every worker must call it; worker 0 returns the status.
template <class Problem, class Team>
FLATMTL_HD inline Status solve_as_kernel(const Problem& problem, const double* M, int K, double* w, double* work,
                                         double* staged, double* zeros, bool nan_if_nonfinite, int lanes,
                                         const Team& team) {
  const int64_t KK = int64_t(K) * K;
  const bool nonfinite = nan_if_nonfinite && team_any(team, !all_finite(M, KK, team.rank(), team.size()));
  if (staged != nullptr || nonfinite) {
    double* copy = staged != nullptr ? staged : zeros;
    for (int64_t e = team.rank(); e < KK; e += team.size()) copy[e] = nonfinite ? 0.0 : M[e];
    team.sync();
  }
  const double* m = staged != nullptr ? staged : nonfinite ? zeros : M;
  Status status{0, 1};
  if constexpr (is_row_parallel<Problem>) {
    status = solve_by_rows(problem, m, K, w, work, lanes, team);
  } else if constexpr (is_team_solver<Problem>) {
    status = problem(m, K, w, work, team);
  } else if (team.rank() == 0) {
    status = problem(m, K, w, work);
  }
  if (nonfinite) {
    team.sync();  // every write of the solve's w is done
    for (int k = team.rank(); k < K; k += team.size()) w[k] = NAN;
    team.sync();
  }
  return status;
}

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
// receives {iterations, converged} (int32). nan_if_nonfinite: see solve_as_kernel. Returns an
// empty string on success, else the CUDA error. Instantiated in csrc/cuda/solvers.cu.
template <class Problem>
std::string launch(const Problem& problem, const double* M, int K, double* w, double* work, int* status,
                   bool nan_if_nonfinite, int device, uintptr_t stream);

}  // namespace cuda
}  // namespace flatmtl::solvers
