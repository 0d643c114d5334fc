// Solvers made of K independent per-task sub-problems (UPGrad's K dual-cone QPs, PCGrad's and GradVac's K
// projection sequences), run by a team of workers (team.h): a single-block CUDA kernel spreads the tasks over its
// threads, the CPU module runs a team of one. The result does not depend on the team: every task writes
// its contribution r_i (K doubles) and w_k = ((0 + r_0k) + r_1k) + ... is summed in task order, which is
// also what one worker adding each r_i into w as it goes computes.
//
// A row-parallel problem provides
//   shared_size(K), row_work_size(K)           scratch doubles: common to all tasks, and per worker;
//   prepare(M, K, shared, first, step)         fills its part (e.g. rows first, first + step, ...) of `shared`;
//   row(M, K, i, shared, r, row_work) -> Status  task i's contribution into r (K doubles).
#pragma once

#include <type_traits>

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// Scratch doubles for `lanes` workers: shared part, the contributions (one row when a single worker adds
// each into w at once, else all K), two status slots per worker, and each worker's own scratch.
template <class Problem>
FLATMTL_HD inline int64_t rows_work_size(int K, int lanes) {
  const int64_t contributions = lanes == 1 ? int64_t(K) : int64_t(K) * K;
  return Problem::shared_size(K) + contributions + 2 * int64_t(lanes) + lanes * Problem::row_work_size(K);
}

// Runs `problem` with the first `lanes` workers of `team` (lanes ≤ team.size()); every worker must call it.
// Returns the summed iterations and whether every task converged (the same on every worker).
template <class Problem, class Team>
FLATMTL_HD inline Status solve_by_rows(const Problem& problem, const double* M, int K, double* w, double* work,
                                       int lanes, const Team& team) {
  double* shared = work;
  double* contributions = shared + Problem::shared_size(K);
  double* statuses = contributions + (lanes == 1 ? int64_t(K) : int64_t(K) * K);
  double* row_work = statuses + 2 * int64_t(lanes);
  const int rank = team.rank();
  problem.prepare(M, K, shared, rank, team.size());
  team.sync();
  if (rank < lanes) {
    Status mine{0, 1};
    double* own_work = row_work + rank * Problem::row_work_size(K);
    if (lanes == 1)
      for (int k = 0; k < K; ++k) w[k] = 0.0;
    for (int i = rank; i < K; i += lanes) {
      double* r = lanes == 1 ? contributions : contributions + int64_t(i) * K;
      const Status s = problem.row(M, K, i, shared, r, own_work);
      mine.iterations += s.iterations;
      mine.converged &= s.converged;
      if (lanes == 1)
        for (int k = 0; k < K; ++k) w[k] += r[k];
    }
    statuses[2 * rank] = mine.iterations;
    statuses[2 * rank + 1] = mine.converged;
  }
  team.sync();
  if (lanes > 1) {
    for (int k = rank; k < K; k += team.size()) {
      double s = 0.0;
      for (int i = 0; i < K; ++i) s += contributions[int64_t(i) * K + k];
      w[k] = s;
    }
  }
  Status total{0, 1};
  for (int l = 0; l < lanes; ++l) {
    total.iterations += int(statuses[2 * l]);
    total.converged &= int(statuses[2 * l + 1]);
  }
  return total;
}

// Base of the row-parallel problems (CRTP): the whole solve on one worker, as the CPU module runs it.
template <class Self>
struct RowParallel {
  FLATMTL_HD static int64_t work_size(int K) { return rows_work_size<Self>(K, 1); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    return solve_by_rows(static_cast<const Self&>(*this), M, K, w, work, 1, SoloTeam{});
  }
};

template <class Problem>
constexpr bool is_row_parallel = std::is_base_of<RowParallel<Problem>, Problem>::value;

}  // namespace flatmtl::solvers
