// Race check of the team solves (csrc/include/flatmtl/solvers/team.h, rows.h), built by test_team_races.py
// with ThreadSanitizer: every team and row-parallel solver runs on teams of CPU threads (thread_team.h, the
// split the CUDA kernel makes over its block) on random Grams. A missing barrier shows as a ThreadSanitizer
// report (a nonzero exit); a result that differs from the single worker's in any bit prints MISMATCH.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "flatmtl/solvers/thread_team.h"

namespace sv = flatmtl::solvers;

namespace {

// The state a solver reads and updates (keys, GradVac's targets, Nash-MTL's α), fresh for each run.
struct State {
  std::vector<double> keys, targets, alpha;
  explicit State(int K) : keys(size_t(K) * K), targets(size_t(K) * K), alpha(K, 1.0) {
    std::mt19937_64 rng(K);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (auto& x : keys) x = u(rng);
    for (auto& x : targets) x = 2.0 * u(rng) - 1.0;
  }
};

// Output and state of one solve, bit for bit.
struct Result {
  std::vector<double> w, targets, alpha;
  sv::Status status;
  bool operator==(const Result& o) const {
    return w.size() == o.w.size() && !memcmp(w.data(), o.w.data(), w.size() * sizeof(double)) &&
           !memcmp(targets.data(), o.targets.data(), targets.size() * sizeof(double)) &&
           !memcmp(alpha.data(), o.alpha.data(), alpha.size() * sizeof(double)) &&
           status.iterations == o.status.iterations && status.converged == o.status.converged;
  }
};

// threads = 0: the single worker. nan_if_nonfinite: the threads apply the kernel's non-finite policy.
template <class Problem, class Make>
Result run(const Make& make, const std::vector<double>& M, int K, int threads, int lanes, bool nan_if_nonfinite) {
  State state(K);
  const Problem problem = make(state);
  int64_t size = Problem::work_size(K);
  if constexpr (sv::is_row_parallel<Problem>) size = sv::rows_work_size<Problem>(K, threads ? lanes : 1);
  std::vector<double> w(K), work(size + 1);
  const sv::Status status =
      threads ? sv::solve_threaded(problem, M.data(), K, w.data(), work.data(), threads, lanes, nan_if_nonfinite)
              : problem(M.data(), K, w.data(), work.data());
  return {w, state.targets, state.alpha, status};
}

// The teams' result equals the single worker's on M, or, with a non-finite M (its first entry NaN), the single
// worker's on M = 0 with NaN weights: the policy's staging of zeros and its vote run on the threads too.
template <class Problem, class Make>
int check(const char* name, const Make& make, const std::vector<double>& M, int K) {
  const bool nonfinite = M[0] != M[0];
  Result single = run<Problem>(make, nonfinite ? std::vector<double>(M.size(), 0.0) : M, K, 0, 0, false);
  if (nonfinite) single.w.assign(size_t(K), NAN);
  int mismatches = 0;
  for (int threads : {2, 3, 5}) {
    const int lanes = sv::is_row_parallel<Problem> ? threads - 1 + (threads == 2) : threads;
    if (!(run<Problem>(make, M, K, threads, lanes, nonfinite) == single)) {
      std::printf("MISMATCH %s K=%d threads=%d lanes=%d\n", name, K, threads, lanes);
      ++mismatches;
    }
  }
  return mismatches;
}

// M = G Gᵀ for a random G (K x (2K + 3)) of the given rank.
std::vector<double> random_gram(int K, int rank, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  const int N = 2 * K + 3;
  std::vector<double> A(size_t(K) * rank), B(size_t(rank) * N), G(size_t(K) * N, 0.0), M(size_t(K) * K, 0.0);
  for (auto& x : A) x = normal(rng);
  for (auto& x : B) x = normal(rng);
  for (int i = 0; i < K; ++i)
    for (int r = 0; r < rank; ++r)
      for (int n = 0; n < N; ++n) G[size_t(i) * N + n] += A[size_t(i) * rank + r] * B[size_t(r) * N + n];
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j)
      for (int n = 0; n < N; ++n) M[size_t(i) * K + j] += G[size_t(i) * N + n] * G[size_t(j) * N + n];
  return M;
}

}  // namespace

int main() {
  std::mt19937_64 rng(2026);
  int mismatches = 0;
  for (int K : {1, 2, 3, 7, 20}) {
    for (int rank : {K, (K + 1) / 2}) {
      const std::vector<double> M = random_gram(K, rank, rng);
      mismatches += check<sv::Mgda>("mgda", [](State&) { return sv::Mgda{{}, 1, nullptr, 250, 1e-5}; }, M, K);
      mismatches += check<sv::NashMtl>(
          "nash_mtl", [](State& s) { return sv::NashMtl{{}, s.alpha.data(), 20, 1.0, 1, sv::kDoubleEps}; }, M, K);
      mismatches +=
          check<sv::FairGrad>("fairgrad", [](State&) { return sv::FairGrad{{}, 0.5, sv::kDoubleEps}; }, M, K);
      mismatches += check<sv::Imtlg>("imtlg", [](State&) { return sv::Imtlg{{}, 1.2e-7}; }, M, K);
      mismatches += check<sv::AlignedMtl>("aligned_mtl", [](State&) { return sv::AlignedMtl{{}, 1.2e-7}; }, M, K);
      mismatches += check<sv::UPGrad>("upgrad", [](State&) {
        sv::UPGrad p{};
        p.norm_eps = 0.0;
        p.reg_eps = 1e-4;
        return p;
      }, M, K);
      mismatches += check<sv::DualProj>("dualproj", [](State&) {
        sv::DualProj p{};
        p.norm_eps = 0.0;
        p.reg_eps = 1e-4;
        return p;
      }, M, K);
      mismatches += check<sv::CAGrad>("cagrad", [](State&) { return sv::CAGrad{{}, 0.4, 1, 0}; }, M, K);
      mismatches += check<sv::IMGrad>("imgrad", [](State&) { return sv::IMGrad{{}, 0.8, 0}; }, M, K);
      mismatches += check<sv::IMGrad>("imgrad_paper", [](State&) { return sv::IMGrad{{}, 0.8, 1}; }, M, K);
      mismatches += check<sv::AffinityPropagation>(
          "affinity_propagation", [](State&) { return sv::AffinityPropagation{{}, nullptr, 0.5, 15, 200, 2, 7}; }, M, K);
      mismatches += check<sv::PCGrad>("pcgrad", [](State& s) { return sv::PCGrad{{}, s.keys.data()}; }, M, K);
      mismatches += check<sv::GradVac>(
          "gradvac", [](State& s) { return sv::GradVac{{}, s.keys.data(), s.targets.data(), 0.5, 1e-8}; }, M, K);
      // Not positive semidefinite: Aligned-MTL's Jacobi on M itself instead of on its Cholesky factor.
      std::vector<double> indefinite = M;
      for (int i = 0; i < K; ++i) indefinite[size_t(i) * K + i] -= 0.3 * M[0];
      mismatches += check<sv::AlignedMtl>(
          "aligned_mtl_indefinite", [](State&) { return sv::AlignedMtl{{}, 1.2e-7}; }, indefinite, K);
    }
  }
  // The non-finite policy on a team solver, a row-parallel one and a stateful one; K = 70: M is not staged.
  for (int K : {3, 70}) {
    std::vector<double> corrupted = random_gram(K, K, rng);
    corrupted[0] = NAN;
    mismatches += check<sv::Mgda>("mgda_nan", [](State&) { return sv::Mgda{{}, 1, nullptr, 250, 1e-5}; }, corrupted, K);
    mismatches += check<sv::GradVac>(
        "gradvac_nan", [](State& s) { return sv::GradVac{{}, s.keys.data(), s.targets.data(), 0.5, 1e-8}; }, corrupted,
        K);
    mismatches += check<sv::NashMtl>(
        "nash_mtl_nan", [](State& s) { return sv::NashMtl{{}, s.alpha.data(), 20, 1.0, 1, 2.220446049250313e-16}; }, corrupted, K);
  }
  std::printf("%d mismatches\n", mismatches);
  return mismatches != 0;
}
