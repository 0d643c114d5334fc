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

// Lane `lane` (0-3) of dot(a, b, n): its interleaved partial sum (entries k ≡ lane mod 4 of the groups of four,
// plus the tail for lane 0), so that (lane 0 + lane 1) + (lane 2 + lane 3) is dot()'s result bit for bit.
FLATMTL_HD inline double dot_lane(const double* a, const double* b, int n, int lane) {
  const int whole = n - n % 4;
  double s = 0.0;
  for (int k = lane; k < whole; k += 4) s += a[k] * b[k];
  for (int k = whole; lane == 0 && k < n; ++k) s += a[k] * b[k];
  return s;
}

// The rotation making two rows with squared norms app, aqq and inner product apq orthogonal: t = tan θ. None
// (false) when they are orthogonal to working precision, or one is below `noise` (squared norm): such rows are
// rounding, rotating them against the others can cycle at the rounding level, and every caller's cut-off drops
// them.
struct JacobiRotation {
  double cs, sn, t;
  FLATMTL_HD bool make(double app, double aqq, double apq, double noise) {
    if (!(fabs(apq) > kDoubleEps * sqrt(app) * sqrt(aqq)) || min2(app, aqq) <= noise) return false;  // or NaN
    const double zeta = (aqq - app) / (2.0 * apq);
    t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
    cs = 1.0 / sqrt(1.0 + t * t);
    sn = cs * t;
    return true;
  }
  // Entries first, first + step, ... below n of rows x and y.
  FLATMTL_HD void apply(double* x, double* y, int n, int first = 0, int step = 1) const {
    for (int r = first; r < n; r += step) {
      const double u = x[r], v = y[r];
      x[r] = cs * u - sn * v;
      y[r] = sn * u + cs * v;
    }
  }
  // The squared norms after the rotation, which keeps app + aqq and app aqq − apq² and makes apq 0 (t² + 2ζt = 1):
  // one dot product a pair instead of three, as LAPACK's dgesvj.
  FLATMTL_HD void update_norms(double* norm_p, double* norm_q, double apq) const {
    const double app = *norm_p, aqq = *norm_q;
    *norm_p = max2(0.0, app - t * apq);
    *norm_q = max2(0.0, aqq + t * apq);
  }
};

// The SVD of the n x rows matrix A (rows ≤ n) given by its transpose B = Aᵀ (row-major, so A's columns are
// B's rows), in place: on return row k of B is σ_k U_k and, unless W (rows x rows) is null, row k of W is the
// right singular vector V_k (A V = U Σ). Accurate to rounding for the small singular values too (unlike an
// eigendecomposition of AᵀA), which the callers' cut-offs need. norms: rows doubles of scratch. Returns the
// sweeps used and whether the rows became orthogonal within max_sweeps.
// A team splits each round's pairs; a team of at least two workers a pair (a CUDA block at K ≤ size) gives
// each pair a group of up to four, which share its dot product by dot()'s four lanes and its rotation by entries.
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
  const int pairs = players / 2;
  const int group = pairs > 0 && team.size() >= 2 * pairs ? int(min2(4.0, double(team.size() / pairs))) : 1;
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
      if (group == 1) {
        for (int k = first_owned(team, 0); k < pairs; k += team.size()) {
          int p, q;
          tournament_pair(players, round, k, &p, &q);
          if (q >= rows) continue;
          double* bp = B + int64_t(p) * n;
          double* bq = B + int64_t(q) * n;
          const double apq = dot(bp, bq, n);
          JacobiRotation rotation;
          if (!rotation.make(norms[p], norms[q], apq, noise)) continue;
          rotated = true;
          rotation.apply(bp, bq, n);
          if (W != nullptr) rotation.apply(W + int64_t(p) * rows, W + int64_t(q) * rows, rows);
          rotation.update_norms(norms + p, norms + q, apq);
        }
        team.sync();
        continue;
      }
      // Worker `member` of group k: the lanes member, member + group, ... of the dot product into the team's
      // slots (4 a pair: 4 pairs ≤ 2 size), then the entries member, member + group, ... of the rotation.
      const int k = team.rank() / group, member = team.rank() % group;
      int p = 0, q = rows;
      if (k < pairs) tournament_pair(players, round, k, &p, &q);
      const bool mine = q < rows;
      double* slots = team.slots() + 4 * k;
      double* bp = B + int64_t(p) * n;
      double* bq = B + int64_t(q) * n;
      for (int lane = member; mine && lane < 4; lane += group) slots[lane] = dot_lane(bp, bq, n, lane);
      team.sync();
      const double apq = mine ? (slots[0] + slots[1]) + (slots[2] + slots[3]) : 0.0;
      JacobiRotation rotation;
      const bool rotate = mine && rotation.make(norms[p], norms[q], apq, noise);
      if (rotate) {
        rotated = true;
        rotation.apply(bp, bq, n, member, group);
        if (W != nullptr) rotation.apply(W + int64_t(p) * rows, W + int64_t(q) * rows, rows, member, group);
      }
      team.sync();  // every member has read the norms and the slots
      if (rotate && member == 0) rotation.update_norms(norms + p, norms + q, apq);
    }
    if (group > 1) team.sync();  // the last round's norms are written before the next sweep recomputes them
    // "Did any worker rotate?" as a team minimum (every worker must call it, even the single one).
    if (team_first_min(team, rotated ? 0.0 : INFINITY, rotated ? 0 : -1) < 0) return {sweep, 1};
  }
  return {max_sweeps, 0};
}

}  // namespace flatmtl::solvers
