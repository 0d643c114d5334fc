// CPU threads standing in for the threads of a CUDA block (team.h's interface): the bindings' solve_<name>_threaded
// and the race check (tests/solvers/team_race_check.cpp) run the kernels' splits with them. Host code only.
#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "flatmtl/solvers/solvers.h"

namespace flatmtl::solvers {

// A barrier for a team of CPU threads (C++17 has no std::barrier): the last to arrive releases the rest.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      released_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  int count_;
  int waiting_ = 0;
  int generation_ = 0;
};

struct ThreadTeam {
  int r;
  int n;
  Barrier* barrier;
  double* shared_slots;
  int rank() const { return r; }
  int size() const { return n; }
  void sync() const { barrier->wait(); }
  double* slots() const { return shared_slots; }
};

// Runs a solve on `threads` CPU threads as the CUDA kernel runs it on the threads of its block: solve_as_kernel,
// with M staged (here in host memory) where the kernel stages it, a row-parallel problem's tasks spread over the
// first `lanes`, a team solver on all of them. Lets the tests check, without a GPU, that the team gives exactly
// the single worker's result, and the kernel's non-finite policy (nan_if_nonfinite).
template <class Problem>
Status solve_threaded(const Problem& problem, const double* M, int K, double* w, double* work, int threads, int lanes,
                      bool nan_if_nonfinite = false) {
  Barrier barrier(threads);
  std::vector<double> slots(2 * size_t(threads));
  const bool stage = K <= cuda::kMaxStagedK;
  std::vector<double> staged(stage ? size_t(K) * K : 0), zeros(!stage && nan_if_nonfinite ? size_t(K) * K : 0);
  auto run = [&](int r) {
    return solve_as_kernel(problem, M, K, w, work, stage ? staged.data() : nullptr, zeros.data(), nan_if_nonfinite,
                           lanes, ThreadTeam{r, threads, &barrier, slots.data()});
  };
  std::vector<std::thread> others;
  for (int r = 1; r < threads; ++r) others.emplace_back([&, r] { run(r); });
  const Status status = run(0);
  for (auto& t : others) t.join();
  return status;
}

}  // namespace flatmtl::solvers
