// Teams of workers that run one solve together: the threads of a CUDA block (csrc/cuda/solvers.cu), CPU
// threads in the tests (thread_team.h) or, in the CPU module, a single worker (SoloTeam).
//
// A team has rank(), size(), sync() (a barrier every worker reaches) and slots() (2 size() doubles that
// every worker reads and writes, for the reductions below; SoloTeam has none and needs none).
//
// A team solve gives the single worker's result bit for bit, whatever the team size, by three rules:
//  - the team splits the entries of an output (entry i belongs to worker i mod size) and never regroups a
//    sum: each entry is computed by one worker with the single worker's sequence of operations;
//  - scalars made of O(K) work (dot products, argmins, stopping tests) are computed by every worker from
//    the shared data, identically, so every worker takes the same branches and no broadcast is needed;
//  - a phase that writes an array another worker reads next, or that overwrites an array other workers
//    are still reading, ends with sync(). Every team function returns with its results visible to all.
#pragma once

#include <math.h>

#include <type_traits>

#ifdef __CUDACC__
#define FLATMTL_HD __host__ __device__
#else
#define FLATMTL_HD
#endif

namespace flatmtl::solvers {

// The CPU module's team: one worker, nothing to wait for.
struct SoloTeam {
  FLATMTL_HD int rank() const { return 0; }
  FLATMTL_HD int size() const { return 1; }
  FLATMTL_HD void sync() const {}
  FLATMTL_HD double* slots() const { return nullptr; }
};

// The first index ≥ begin that belongs to this worker: loop `for (i = first_owned(team, b); i < e; i += size)`.
template <class Team>
FLATMTL_HD inline int first_owned(const Team& team, int begin) {
  const int size = team.size();
  return begin + ((team.rank() - begin) % size + size) % size;
}

template <class Team>
FLATMTL_HD inline bool owns(const Team& team, int i) {
  return i % team.size() == team.rank();
}

// The index of the smallest of the workers' candidates (key, index) (index < 0: no candidate), the smallest
// index among equal keys; a key that is not below +inf (+inf, NaN) never wins. -1 when none does. Exact, so
// the same for any split of the candidates. Every worker must call it.
template <class Team>
FLATMTL_HD inline int team_first_min(const Team& team, double key, int index) {
  if (!(key < INFINITY)) index = -1;
  if (team.size() == 1) return index;
  double* slots = team.slots();
  slots[2 * team.rank()] = key;
  slots[2 * team.rank() + 1] = index;
  team.sync();
  double best_key = INFINITY;
  int best = -1;
  for (int r = 0; r < team.size(); ++r) {
    const int candidate = int(slots[2 * r + 1]);
    if (candidate < 0) continue;
    const double k = slots[2 * r];
    if (best < 0 || k < best_key || (k == best_key && candidate < best)) {
      best_key = k;
      best = candidate;
    }
  }
  team.sync();  // the slots are free again
  return best;
}

// Whether any worker's `mine` is true, on every worker. Every worker must call it.
template <class Team>
FLATMTL_HD inline bool team_any(const Team& team, bool mine) {
  if (team.size() == 1) return mine;
  double* slots = team.slots();
  slots[team.rank()] = mine ? 1.0 : 0.0;
  team.sync();
  bool any = false;
  for (int r = 0; r < team.size(); ++r) any = any || slots[r] != 0.0;
  team.sync();  // the slots are free again
  return any;
}

// Runs `solve` (returning a Status) on worker 0 alone, for sequential steps and rare paths not worth
// splitting, once every worker has finished reading what it may overwrite, and gives every worker its
// status once its writes are visible.
template <class Team, class Solve>
FLATMTL_HD inline auto on_one_worker(const Team& team, const Solve& solve) {
  if (team.size() == 1) return solve();
  double* slots = team.slots();
  team.sync();
  if (team.rank() == 0) {
    const auto status = solve();
    slots[0] = status.iterations;
    slots[1] = status.converged;
  }
  team.sync();
  decltype(solve()) status{int(slots[0]), int(slots[1])};
  team.sync();  // the slots are free again
  return status;
}

// Base of the solvers written for a team: every worker calls operator()(M, K, w, work, team), which
// defaults to a SoloTeam. The other solvers (not row-parallel, rows.h) run on one worker.
struct TeamSolver {};

template <class Problem>
constexpr bool is_team_solver = std::is_base_of<TeamSolver, Problem>::value;

}  // namespace flatmtl::solvers
