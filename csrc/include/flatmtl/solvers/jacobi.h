// One-sided Jacobi (Hestenes) SVD of a small square matrix, for the solvers that need singular vectors
// (IMTL-G's fallback, Aligned-MTL's eigendecomposition). Pairs are visited in round-robin order: each
// round rotates n/2 disjoint pairs of rows, so a team rotates them at once with one barrier a round, and
// the result does not depend on the team's size (disjoint rotations commute exactly).
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// Pair `k` (k < m/2) of round `round` (round < m − 1) of a round-robin tournament of m (even) players, in
// which every player plays once a round and every pair meets once in m − 1 rounds: player m − 1 stays
// put while the others turn (the circle method). Returns the pair as p < q.
FLATMTL_HD inline void tournament_pair(int m, int round, int k, int* p, int* q) {
  const int turning = m - 1;
  const int a = k == 0 ? turning : (round + k) % turning;
  const int b = k == 0 ? round : (round - k + turning) % turning;
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Rotates rows p and q of B (n entries), and of W (m entries) unless W is null, so that they become
// orthogonal; returns whether they needed it. norm_p and norm_q hold the rows' squared norms, updated with the
// rotation (as LAPACK's dgesvj does: one dot product a pair instead of three). Rows below `noise` (squared
// norms) are rounding: rotating them against the others can cycle at the rounding level, and every caller's
// cut-off drops them.
FLATMTL_HD inline bool jacobi_rotate(double* bp, double* bq, int n, double* wp, double* wq, int m, double* norm_p,
                                     double* norm_q, double noise) {
  const double app = *norm_p, aqq = *norm_q, apq = dot(bp, bq, n);
  if (!(fabs(apq) > kDoubleEps * sqrt(app * aqq)) || min2(app, aqq) <= noise) return false;  // or NaN
  const double zeta = (aqq - app) / (2.0 * apq);
  const double t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
  const double cs = 1.0 / sqrt(1.0 + t * t), sn = cs * t;
  for (int r = 0; r < n; ++r) {
    const double x = bp[r], y = bq[r];
    bp[r] = cs * x - sn * y;
    bq[r] = sn * x + cs * y;
  }
  for (int r = 0; wp != nullptr && r < m; ++r) {
    const double x = wp[r], y = wq[r];
    wp[r] = cs * x - sn * y;
    wq[r] = sn * x + cs * y;
  }
  // The rotation keeps app + aqq and app aqq − apq² and makes apq 0 (t² + 2ζt = 1).
  *norm_p = max2(0.0, app - t * apq);
  *norm_q = max2(0.0, aqq + t * apq);
  return true;
}

// The SVD of the n x rows matrix A (rows ≤ n) given by its transpose B = Aᵀ (row-major, so A's columns are
// B's rows), in place: on return row k of B is σ_k U_k and, unless W (rows x rows) is null, row k of W is the
// right singular vector V_k (A V = U Σ). Accurate to rounding for the small singular values too (unlike an
// eigendecomposition of AᵀA), which the callers' cut-offs need. norms: rows doubles of scratch. Returns the
// sweeps used and whether the rows became orthogonal within max_sweeps. A team splits each round's pairs.
template <class Team = SoloTeam>
FLATMTL_HD inline Status jacobi_svd(double* B, int rows, int n, double* W, double* norms, int max_sweeps,
                                    const Team& team = Team{}) {
  for (int i = first_owned(team, 0); W != nullptr && i < rows; i += team.size()) {
    for (int j = 0; j < rows; ++j) W[int64_t(i) * rows + j] = i == j ? 1.0 : 0.0;
  }
  // Every worker reads B before any rotation.
  const double noise = kDoubleEps * kDoubleEps * dot(B, B, int(int64_t(rows) * n));
  team.sync();
  const int players = rows + (rows & 1);  // an odd count gets a bye each round: pairs with player `rows`
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    // Exact norms at each sweep's start: the updated ones drift, and a sweep without rotations (the stopping
    // test) then decides on exact ones.
    for (int k = first_owned(team, 0); k < rows; k += team.size()) {
      const double* bk = B + int64_t(k) * n;
      norms[k] = dot(bk, bk, n);
    }
    team.sync();
    bool rotated = false;
    for (int round = 0; round < players - 1; ++round) {
      for (int k = first_owned(team, 0); k < players / 2; k += team.size()) {
        int p, q;
        tournament_pair(players, round, k, &p, &q);
        if (q >= rows) continue;
        double* wp = W == nullptr ? nullptr : W + int64_t(p) * rows;
        double* wq = W == nullptr ? nullptr : W + int64_t(q) * rows;
        rotated |= jacobi_rotate(B + int64_t(p) * n, B + int64_t(q) * n, n, wp, wq, rows, norms + p, norms + q, noise);
      }
      team.sync();
    }
    // "Did any worker rotate?" as a team minimum (every worker must call it, even the single one).
    if (team_first_min(team, rotated ? 0.0 : INFINITY, rotated ? 0 : -1) < 0) return {sweep, 1};
  }
  return {max_sweeps, 0};
}

}  // namespace flatmtl::solvers
