// Aligned-MTL's balance transformation from the Gram (reference/aligned_mtl.py): with M = VΛVᵀ and the
// eigenvalues λ > λ_max K rank_eps kept, w = B𝟏 for B = √λ_min V Λ^{-1/2} Vᵀ (w = 𝟏 when none is kept).
// The reference calls LAPACK's eigh, which torch checks on the host (a synchronisation on CUDA); this one
// runs in the solver's kernel.
#pragma once

#include "flatmtl/solvers/common.h"
#include "flatmtl/solvers/jacobi.h"

namespace flatmtl::solvers {

struct AlignedMtl : TeamSolver {
  // The rank cut-off's unit roundoff (the official code's float32 eps, whatever the data's dtype).
  double rank_eps;
  static constexpr int kMaxSweeps = 64;

  // The scratch: A (M, then its Schur complements), the factor's rows R (K x K each); then K each: the
  // eliminated indices, the eigenvalues, B's coefficients and the Jacobi norms.
  struct Scratch {
    double *A, *R, *eliminated, *lambda, *coef, *norms;
    FLATMTL_HD Scratch(double* work, int K)
        : A(work), R(A + int64_t(K) * K), eliminated(R + int64_t(K) * K), lambda(eliminated + K),
          coef(lambda + K), norms(coef + K) {}
  };
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) * K + 4 * int64_t(K); }

  // The eigenvectors of M come from the SVD of a factor: pivoted Cholesky M = Rᵀ R (R's rows r_j, in M's own
  // index order) down to rounding-level pivots, then one-sided Jacobi on R's rows, which turns them into
  // σ_k v_k with M v_k = σ_k² v_k. Against Jacobi on M itself this halves each rotation (no vectors to
  // accumulate), needs fewer sweeps and keeps the relative accuracy of the small σ_k. Dropping the remaining
  // Schur complement S (diagonal ≤ eps max M_ii) moves the eigenvalues by ≤ K eps max M_ii, below LAPACK's own
  // backward error. An M that is not positive semidefinite beyond rounding (an entry of S above the rounding of
  // the updates, 4 K eps max M_ii) is not a Gram matrix; it is factored again shifted by its Gershgorin bound
  // c ≥ −λ_min (the same eigenvectors, eigenvalues σ_k² − c: absolute accuracy eps c, as LAPACK's).
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    const Scratch at(work, K);
    double* R = at.R;
    double* lambda = at.lambda;
    // w is scale-free: M is taken times the power of two (exact) that brings it near 1, so that the products of
    // the Cholesky and Jacobi steps stay in range for Gram entries up to the largest double.
    const double scale = unit_scale(M, K);
    double shift = 0.0;
    int rank = 0;
    if (!factor(M, K, scale, shift, at, &rank, team)) {
      for (int i = 0; i < K; ++i) {
        double row = 0.0;
        for (int j = 0; j < K; ++j) row += fabs(M[int64_t(i) * K + j]) * scale;
        shift = max2(shift, row);
      }
      factor(M, K, scale, shift, at, &rank, team);
    }
    const Status status = jacobi_svd(R, rank, K, nullptr, at.norms, kMaxSweeps, team);
    for (int k = first_owned(team, 0); k < rank; k += team.size()) {
      double* rk = R + int64_t(k) * K;
      const double squared = dot(rk, rk, K);
      lambda[k] = squared - shift;
      const double inverse = squared > 0.0 ? 1.0 / sqrt(squared) : 0.0;
      for (int j = 0; j < K; ++j) rk[j] *= inverse;  // v_k
    }
    team.sync();
    balance(K, R, lambda, rank, w, at.coef, team);
    return status;
  }

  // Pivoted Cholesky of scale M + shift I into R's rows (using A and the eliminated flags), down to pivots ≤ eps
  // max diagonal; *rank gets the rows made. Returns whether the Schur complement left is rounding (every entry
  // ≤ 4 K eps max diagonal), as it is for a positive semidefinite matrix.
  template <class Team>
  FLATMTL_HD static bool factor(const double* M, int K, double scale, double shift, const Scratch& at, int* rank,
                                const Team& team) {
    double* A = at.A;
    double* R = at.R;
    double* eliminated = at.eliminated;
    double max_diag = 0.0;
    for (int k = 0; k < K; ++k) max_diag = max2(max_diag, M[int64_t(k) * K + k] * scale + shift);
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      for (int j = 0; j < K; ++j) A[int64_t(i) * K + j] = M[int64_t(i) * K + j] * scale + (i == j ? shift : 0.0);
      eliminated[i] = 0.0;
    }
    team.sync();
    int made = 0;
    for (; made < K; ++made) {
      int p = -1;
      double pivot = kDoubleEps * max_diag;
      for (int i = 0; i < K; ++i) {
        if (eliminated[i] == 0.0 && A[int64_t(i) * K + i] > pivot) {
          pivot = A[int64_t(i) * K + i];
          p = i;
        }
      }
      if (p < 0) break;
      const double d = sqrt(pivot);
      double* r = R + int64_t(made) * K;
      for (int i = first_owned(team, 0); i < K; i += team.size()) {
        r[i] = eliminated[i] != 0.0 ? 0.0 : A[int64_t(i) * K + p] / d;
      }
      team.sync();  // every worker has chosen p before its owner marks it
      if (owns(team, p)) eliminated[p] = 1.0;
      // The Schur complement (column p becomes rounding, never read again; r_j = 0 at the earlier pivots).
      for (int i = first_owned(team, 0); i < K; i += team.size()) {
        if (eliminated[i] != 0.0) continue;
        double* a = A + int64_t(i) * K;
        for (int j = 0; j < K; ++j) a[j] -= r[i] * r[j];
      }
      team.sync();
    }
    *rank = made;
    bool indefinite = false;
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      for (int j = 0; eliminated[i] == 0.0 && j < K; ++j) {
        indefinite |= eliminated[j] == 0.0 && !(fabs(A[int64_t(i) * K + j]) <= 4.0 * K * kDoubleEps * max_diag);
      }
    }
    return team_first_min(team, indefinite ? 0.0 : INFINITY, indefinite ? 0 : -1) < 0;
  }

  // w = Σ_k √(λ_min / λ_k) (v_k·𝟏) v_k over the kept λ_k > λ_max K rank_eps (the unit v_k are V's rows), or 𝟏
  // when none is kept. The eigenvalues left out of V are never kept: 0 for a Gram, −shift otherwise.
  template <class Team>
  FLATMTL_HD void balance(int K, const double* V, const double* lambda, int count, double* w, double* coef,
                          const Team& team) const {
    double lambda_max = -INFINITY;
    for (int k = 0; k < count; ++k) lambda_max = max2(lambda_max, lambda[k]);
    const double threshold = lambda_max * K * rank_eps;
    double lambda_min = INFINITY;
    for (int k = 0; k < count; ++k) {
      if (lambda[k] > threshold) lambda_min = min2(lambda_min, lambda[k]);
    }
    for (int k = first_owned(team, 0); k < count; k += team.size()) {
      const double* vk = V + int64_t(k) * K;
      double total = 0.0;
      for (int j = 0; j < K; ++j) total += vk[j];
      coef[k] = lambda[k] > threshold ? sqrt(lambda_min / lambda[k]) * total : 0.0;
    }
    team.sync();
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      double wi = 0.0;
      for (int k = 0; k < count; ++k) wi += coef[k] * V[int64_t(k) * K + i];
      w[i] = lambda_min < INFINITY ? wi : 1.0;
    }
    team.sync();
  }
};

}  // namespace flatmtl::solvers
