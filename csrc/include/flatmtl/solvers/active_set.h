// The primal active-set method behind the dual-cone projections (UPGrad, DualProj) and the simplex
// problems (CAGrad, IMGrad): for a positive definite A,
//   min ½xᵀAx + cᵀx   over x ≥ 0, or over the simplex Δ (x ≥ 0, 𝟏ᵀx = 1),
// solved exactly (to rounding), as quadprog does for the reference. The free set F (x_F > 0) carries a
// Cholesky factor of A_FF that is extended by a row when an index is freed and rotated when one is
// bound, together with the forward solves s = L⁻¹(−c_F) and, on the simplex, t = L⁻¹𝟏_F, so each
// subspace solve is one back substitution. A solve starts either from a guessed free set (one
// factorisation, then corrections: start_from) or from the state of the previous solve, which persists:
// a problem that changes only c restarts from the previous free set (CAGrad's outer iteration).
// A team (team.h) splits the factorisation, the triangular sweeps, the rotations and the gradient.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// Move the free x_k toward the subspace minimiser z (indexed like free_list), stopping where the first
// free x_k reaches 0. Returns the position in free_list of the blocking index, or -1 when the full
// step is feasible (then x_F = z).
template <class Team = SoloTeam>
FLATMTL_HD inline int step_toward(const double* z, const int* free_list, int n_free, double* x,
                                  const Team& team = Team{}) {
  double alpha = 1.0;
  int block = -1;
  for (int f = 0; f < n_free; ++f) {
    if (z[f] > 0.0) continue;
    const double xk = x[free_list[f]];
    const double a = xk > 0.0 ? xk / (xk - z[f]) : 0.0;
    if (a < alpha) {
      alpha = a;
      block = f;
    }
  }
  team.sync();
  for (int f = first_owned(team, 0); f < n_free; f += team.size()) {
    const int k = free_list[f];
    x[k] = block < 0 ? z[f] : x[k] + alpha * (z[f] - x[k]);
  }
  team.sync();
  return block;
}

// Rotates entries a, a+1 of v by (c, s).
FLATMTL_HD inline void rotate_pair(double* v, int a, double c, double s) {
  const double u = v[a];
  const double w = v[a + 1];
  v[a] = c * u + s * w;
  v[a + 1] = c * w - s * u;
}

// Removes row/column f from the n x n Cholesky factor L (row stride lda) of A = L Lᵀ: the rows below f
// move up one and the sub-diagonal this leaves is zeroed by Givens rotations of adjacent columns, so
// the leading (n-1) x (n-1) block is the factor of A without row/column f (O(n²)). The same rotations
// are applied to s and t (t may be null), so that forward solves L s = b stay ones for the reduced
// factor and b without entry f. A team moves columns, then rotates rows, one rotation at a time.
template <class Team = SoloTeam>
FLATMTL_HD inline void cholesky_delete(double* L, int n, int lda, int f, double* s, double* t,
                                       const Team& team = Team{}) {
  if (team.size() == 1) {  // by rows, contiguous
    for (int a = f; a < n - 1; ++a) {
      double* dst = L + int64_t(a) * lda;
      for (int m = 0; m <= a + 1; ++m) dst[m] = dst[m + lda];
    }
  } else {  // by columns: each worker moves its own
    for (int m = first_owned(team, 0); m < n; m += team.size()) {
      for (int a = f > m - 1 ? f : m - 1; a < n - 1; ++a) L[int64_t(a) * lda + m] = L[int64_t(a + 1) * lda + m];
    }
    team.sync();
  }
  // Every worker reads row a's two entries for rotation a; the owner of row a stores them one rotation later.
  double r = 0.0;
  for (int a = f; a < n - 1; ++a) {
    double* ra = L + int64_t(a) * lda;
    const double p = ra[a];
    const double h = ra[a + 1];
    if (a > f && owns(team, a - 1)) {
      L[int64_t(a - 1) * lda + a - 1] = r;
      L[int64_t(a - 1) * lda + a] = 0.0;
    }
    r = sqrt(p * p + h * h);
    const double c = p / r;
    const double sn = h / r;
    for (int b = first_owned(team, a + 1); b < n - 1; b += team.size()) rotate_pair(L + int64_t(b) * lda, a, c, sn);
    if (owns(team, a)) {
      rotate_pair(s, a, c, sn);
      if (t != nullptr) rotate_pair(t, a, c, sn);
    }
    team.sync();
  }
  if (f < n - 1 && owns(team, n - 2)) {
    L[int64_t(n - 2) * lda + n - 2] = r;
    L[int64_t(n - 2) * lda + n - 1] = 0.0;
  }
  team.sync();
}

// z = L⁻ᵀ s for the n x n factor L (row stride lda), by rows of L (contiguous), two per sweep; a team
// splits each sweep's update. z may be s.
template <class Team = SoloTeam>
FLATMTL_HD inline void back_substitute(const double* L, int n, int lda, const double* s, double* z,
                                       const Team& team = Team{}) {
  if (z != s) {
    for (int f = first_owned(team, 0); f < n; f += team.size()) z[f] = s[f];
    team.sync();
  }
  // Every worker reads z_i and z_{i-1} for sweep i; their owners store the results one sweep later.
  double za = 0.0, zb = 0.0;
  int i = n - 1;
  for (; i >= 1; i -= 2) {
    const double* ra = L + int64_t(i) * lda;
    const double* rb = ra - lda;
    const double zi = z[i], zi1 = z[i - 1];
    if (i + 2 < n) {
      if (owns(team, i + 2)) z[i + 2] = za;
      if (owns(team, i + 1)) z[i + 1] = zb;
    }
    za = zi / ra[i];
    zb = (zi1 - ra[i - 1] * za) / rb[i - 1];
    if (team.size() == 1) {  // axpy's groups vectorise; the same operations on each entry
      axpy(-za, ra, z, i - 1);
      axpy(-zb, rb, z, i - 1);
    } else {
      for (int m = first_owned(team, 0); m < i - 1; m += team.size()) {
        z[m] = z[m] + -za * ra[m];
        z[m] = z[m] + -zb * rb[m];
      }
      team.sync();
    }
  }
  if (i + 2 < n) {
    if (owns(team, i + 2)) z[i + 2] = za;
    if (owns(team, i + 1)) z[i + 1] = zb;
  }
  if (i == 0 && owns(team, 0)) z[0] /= L[0];
  team.sync();
}

// The method's state, in caller scratch (work_size(K) doubles). A is symmetric, row-major, stride K. Every
// worker of a team holds a copy of this struct: the arrays are shared, the scalars kept equal.
template <class Team = SoloTeam>
struct ActiveSetQp {
  const double* A;
  int K;
  int simplex;        // 1: also 𝟏ᵀx = 1
  double* L;          // K x K: Cholesky factor of A_FF, F in free_list order
  int* free_list;     // F, in K doubles of the scratch
  double* is_free;    // 1 when free
  double* s;          // L⁻¹(−c_F)
  double* t;          // L⁻¹𝟏_F (simplex)
  double* z;          // subspace solution, indexed like free_list
  double* y;          // gradient A x + c
  double* partial;    // 8K: a team's partial sums in forward_substitute
  int n_free;
  double mu;          // multiplier of 𝟏ᵀx = 1 at the last subspace minimiser (0 off the simplex)
  double shift;       // c̄: on the simplex the method runs on c − c̄𝟏 (the same problem), see forward_solves
  Team team;

  FLATMTL_HD static int64_t work_size(int K) { return int64_t(K) * K + 14 * int64_t(K); }

  // An empty free set (x = 0 is then the start of a nonnegative problem).
  FLATMTL_HD static ActiveSetQp on(const double* A, int K, bool simplex, double* work, const Team& team = Team{}) {
    ActiveSetQp qp{A, K, simplex ? 1 : 0, work, reinterpret_cast<int*>(work + int64_t(K) * K), nullptr, nullptr,
                   nullptr, nullptr, nullptr, nullptr, 0, 0.0, 0.0, team};
    qp.is_free = work + int64_t(K) * K + K;
    qp.s = qp.is_free + K;
    qp.t = qp.s + K;
    qp.z = qp.t + K;
    qp.y = qp.z + K;
    qp.partial = qp.y + K;
    for (int k = first_owned(team, 0); k < K; k += team.size()) qp.is_free[k] = 0.0;
    team.sync();
    return qp;
  }

  // Row f of L for index k against the rows above, and its entries of s and t. False when A_FF
  // would not be positive definite to working precision (the row is then not kept).
  FLATMTL_HD bool factor_row(int f, int k, const double* c) {
    double* row[1] = {L + int64_t(f) * K};
    const double* ak = A + int64_t(k) * K;
    forward_substitute(L, K, f, [&](int g, int) { return ak[free_list[g]]; }, 1, row, partial, team);
    const double d = ak[k] - dot(row[0], row[0], f);
    if (!(d > 0.0)) return false;
    const double root = sqrt(d);
    const double sf = (-(c[k] - shift) - dot(row[0], s, f)) / root;
    const double tf = simplex ? (1.0 - dot(row[0], t, f)) / root : 0.0;
    if (owns(team, f)) {
      row[0][f] = root;
      s[f] = sf;
      if (simplex) t[f] = tf;
    }
    team.sync();
    return true;
  }

  // s = L⁻¹(−c_F) and, on the simplex, t = L⁻¹𝟏_F for the current factor. On the simplex c is first
  // shifted by its mean c̄ over F: z = L⁻ᵀ(s − μt) cancels s against μt, which loses everything when
  // |c_F| dwarfs A's entries (a nearly linear objective: z ≈ 1 comes out as rounding), while at the
  // optimum the c_k (k ∈ F) differ by no more than 2 max|(Ax)_k|, so the shifted c_F stays at A's scale.
  FLATMTL_HD void forward_solves(const double* c) {
    shift = 0.0;
    if (simplex && n_free > 0) {
      for (int f = 0; f < n_free; ++f) shift += c[free_list[f]];
      shift /= n_free;
    }
    double* solutions[2] = {s, t};
    team.sync();  // every worker is done with the last s and t
    forward_substitute(
        L, K, n_free, [&](int f, int j) { return j == 0 ? -(c[free_list[f]] - shift) : 1.0; }, simplex ? 2 : 1,
        solutions, partial, team);
  }

  // Frees index k (x_k stays 0 until the next step).
  FLATMTL_HD bool append(int k, const double* c) {
    team.sync();  // every worker has read is_free[k]
    if (!factor_row(n_free, k, c)) return false;
    if (team.rank() == 0) {
      free_list[n_free] = k;
      is_free[k] = 1.0;
    }
    team.sync();
    ++n_free;
    return true;
  }

  // Binds the index at position f of free_list.
  FLATMTL_HD void remove(int f) {
    cholesky_delete(L, n_free, K, f, s, simplex ? t : nullptr, team);
    if (team.rank() == 0) {
      is_free[free_list[f]] = 0.0;
      for (int g = f; g < n_free - 1; ++g) free_list[g] = free_list[g + 1];
    }
    team.sync();
    --n_free;
  }

  // Empties the free set.
  FLATMTL_HD void clear() {
    for (int f = first_owned(team, 0); f < n_free; f += team.size()) is_free[free_list[f]] = 0.0;
    team.sync();
    n_free = 0;
  }

  // The subspace minimiser on F into z; returns the multiplier μ of 𝟏ᵀx = 1 (0 off the simplex):
  // A_FF z + c_F + μ𝟏 = 0 with 𝟏ᵀz = 1 gives μ = (s·t − 1)/(t·t) and z = L⁻ᵀ(s − μ t).
  FLATMTL_HD double subspace_minimiser() {
    if (!simplex) {
      back_substitute(L, n_free, K, s, z, team);
      return 0.0;
    }
    const double multiplier = (dot(s, t, n_free) - 1.0) / dot(t, t, n_free);
    for (int f = first_owned(team, 0); f < n_free; f += team.size()) z[f] = s[f] - multiplier * t[f];
    team.sync();
    back_substitute(L, n_free, K, z, z, team);
    return multiplier;
  }

  // Starts from the free set marked in is_free (the caller's guess: a positive confidence for each
  // index guessed free, 0 elsewhere): one factorisation, then the indices whose subspace solution is
  // ≤ 0 are dropped until it is positive; x is then that solution (feasible) and mu its multiplier.
  // A few drops are rotated out of the factor at O(|F| · rows after them) each, so the indices below a
  // tenth of the largest confidence, which hold nearly all the wrong guesses, go last; beyond |F|/8
  // drops at once, refactoring is cheaper. Returns false, with an empty free set (x = 0), when A_FF is
  // not positive definite to working precision.
  FLATMTL_HD bool start_from(const double* c, double* x) {
    // Confident indices from the front of free_list, the others from its back, then moved up. Every
    // worker counts the guessed indices (the caller's marks, made by their owners) before worker 0
    // rewrites them.
    team.sync();
    n_free = 0;
    for (int k = 0; k < K; ++k) n_free += is_free[k] > 0.0 ? 1 : 0;
    on_one_worker(team, [&] {
      double most = 0.0;
      for (int k = 0; k < K; ++k) most = max2(most, is_free[k]);
      int front = 0, back = 0;
      for (int k = 0; k < K; ++k) {
        x[k] = 0.0;
        if (!(is_free[k] > 0.0)) {
          is_free[k] = 0.0;  // also a NaN guess
          continue;
        }
        if (is_free[k] >= 0.1 * most) {
          free_list[front++] = k;
        } else {
          free_list[K - 1 - back++] = k;
        }
        is_free[k] = 1.0;
      }
      for (int g = 0; g < back; ++g) free_list[front + g] = free_list[K - back + g];  // front ≤ K − back
      return Status{0, 1};
    });
    mu = 0.0;
    bool factor = true;
    // Each round drops at least one index, so F is empty or positive within K rounds.
    for (int round = 0; round < K && n_free > 0; ++round) {
      if (factor) {
        for (int a = first_owned(team, 0); a < n_free; a += team.size()) {
          const double* row = A + int64_t(free_list[a]) * K;
          for (int b = 0; b <= a; ++b) L[int64_t(a) * K + b] = row[free_list[b]];
        }
        team.sync();
        if (!cholesky(L, n_free, K, team)) {
          clear();
          mu = 0.0;
          return false;
        }
        forward_solves(c);
      }
      mu = subspace_minimiser();
      int drops = 0;
      for (int f = 0; f < n_free; ++f) drops += z[f] > 0.0 ? 0 : 1;
      if (drops == 0) {
        for (int f = first_owned(team, 0); f < n_free; f += team.size()) x[free_list[f]] = z[f];
        team.sync();
        return true;
      }
      factor = 8 * drops > n_free;
      if (factor) {
        team.sync();  // every worker has counted the drops
        if (team.rank() == 0) {
          int kept = 0;
          for (int f = 0; f < n_free; ++f) {
            if (z[f] > 0.0) {
              free_list[kept++] = free_list[f];
            } else {
              is_free[free_list[f]] = 0.0;
            }
          }
        }
        team.sync();
        n_free -= drops;
      } else {
        for (int f = n_free - 1; f >= 0; --f) {
          if (!(z[f] > 0.0)) remove(f);
        }
        team.sync();  // every worker has read z, which the next round overwrites
      }
    }
    mu = 0.0;  // F emptied (x = 0 off the simplex)
    return true;
  }

  // Solves for this c from a feasible x with x_k ≥ 0 on F (x_k = 0 elsewhere), e.g. the previous
  // solution for another c.
  FLATMTL_HD Status solve(const double* c, double* x, int max_rounds) {
    forward_solves(c);
    return iterate(c, x, max_rounds, false);
  }

  // The active-set loop (s must be current for c): move to the subspace minimiser, stepping back and
  // binding an index where a free x_k would turn ≤ 0 (skipped in the first round when at_minimiser:
  // x is that minimiser and mu its multiplier, as start_from leaves them); then free every bound index
  // whose reduced gradient (y_k + μ) is negative beyond its rounding bound, and repeat. Each round
  // strictly lowers the objective, so the number of rounds is finite; max_rounds is a safety budget.
  FLATMTL_HD Status iterate(const double* c, double* x, int max_rounds, bool at_minimiser) {
    double root_diag_max = 0.0;  // as a product of roots, √(A_kk max A_jj) cannot overflow
    for (int k = 0; k < K; ++k) root_diag_max = max2(root_diag_max, clamp_sqrt(A[int64_t(k) * K + k]));
    for (int round = 0; round < max_rounds; ++round) {
      for (int inner = 0; inner <= K && n_free > 0 && !(round == 0 && at_minimiser); ++inner) {
        mu = subspace_minimiser();
        const int block = step_toward(z, free_list, n_free, x, team);
        if (block < 0) break;
        // Bind the blocking index and every other at its bound that is not moving up: a freed index
        // still at 0 with z_k > 0 stays (the step was 0, and z_k > 0 lets the next one move).
        // Several indices freed at once cannot all have z_k ≤ 0 (for the Schur complement S of the
        // new ones and their gradient g < 0, z = S⁻¹|g| has (|g|·z) > 0), so each round progresses.
        if (owns(team, block)) x[free_list[block]] = 0.0;
        team.sync();
        for (int f = n_free - 1; f >= 0; --f) {
          const int k = free_list[f];
          if (x[k] > 0.0 || z[f] > 0.0) continue;
          team.sync();  // every worker has read x_k
          if (owns(team, f)) x[k] = 0.0;
          remove(f);
        }
        team.sync();  // every worker has read z, which the next step overwrites
      }
      if (simplex && n_free == 0) return {round, 0};  // x ∈ Δ keeps an index free, unless NaN
      // y = c − c̄ + Σ_{j∈F} x_j A_j (A symmetric: contiguous rows); |Σ_j A_kj x_j| ≤ √(A_kk max A_jj) ‖x‖₁
      // bounds the rounding of y_k + μ with |c_k − c̄| and |μ|.
      if (team.size() == 1) {
        for (int k = 0; k < K; ++k) y[k] = c[k] - shift;
        add_rows(A, K, free_list, n_free, x, y);
      } else {
        team.sync();  // every worker is done with the last round's y
        for (int k = first_owned(team, 0); k < K; k += team.size()) {
          double yk = c[k] - shift;
          for (int f = 0; f < n_free; ++f) {
            const int j = free_list[f];
            if (x[j] != 0.0) yk += x[j] * A[int64_t(j) * K + k];
          }
          y[k] = yk;
        }
        team.sync();
      }
      double x_sum = 0.0;
      for (int f = 0; f < n_free; ++f) x_sum += x[free_list[f]];
      bool freed = false;
      for (int k = 0; k < K; ++k) {
        if (is_free[k] != 0.0 || !(y[k] + mu < 0.0)) continue;
        const double bound = fabs(c[k] - shift) + fabs(mu) + clamp_sqrt(A[int64_t(k) * K + k]) * root_diag_max * x_sum;
        if (!(y[k] + mu < -8.0 * (K + 1) * kDoubleEps * bound)) continue;
        if (!append(k, c)) return {round, 0};  // A not positive definite to working precision
        freed = true;
      }
      if (!freed) return {round, 1};
    }
    return {max_rounds, 0};
  }
};

}  // namespace flatmtl::solvers
