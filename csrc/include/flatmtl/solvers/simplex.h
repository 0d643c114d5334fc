// The simplex problems of CAGrad and IMGrad (reference/_simplex.py: argmin_linear_plus_norm):
//   w ∈ Δ minimising qᵀw + β √(wᵀMw)   or, squared,   qᵀw + β wᵀMw,
// by exact inner QPs (with a relative 1e-11 ridge, which only picks one w where the optimum is not unique)
// and safeguarded one-dimensional root finding, with the reference's special cases (β = 0, M = 0).
// Measured objective values are at or below the reference's (CLARABEL, good to ~1e-8).
#pragma once

#include "flatmtl/solvers/active_set.h"
#include "flatmtl/solvers/mgda.h"

namespace flatmtl::solvers {

constexpr int kRootBudget = 200;   // evaluations per one-dimensional root
constexpr double kQpRidge = 1e-11;  // relative ridge that makes the inner QPs strictly convex (simplex_matrix)
// ‖g_w‖ at or below this fraction of the largest ‖g_i‖ counts as zero (reference ZERO_GW_RTOL).
constexpr double kZeroGwRtol = 1e-6;

// Root of a nonincreasing f with f(lo) ≥ 0 ≥ f(hi): Illinois (regula falsi) steps, with a bisection
// whenever two steps did not halve the bracket (a step-like f, e.g. a nearly singular inner QP, stalls
// regula falsi). Stops when the bracket is below abs_tol + rel_tol max(|lo|, |hi|). Returns the last
// point evaluated, so the caller's state (left by f) belongs to the returned point.
template <class F>
FLATMTL_HD inline double find_root(F& f, double lo, double flo, double hi, double fhi, double abs_tol, double rel_tol,
                                   bool* ok) {
  double x = hi;
  double width = hi - lo;
  int side = 0;
  bool bisect = false;
  *ok = false;
  for (int it = 0; it < kRootBudget; ++it) {
    x = hi - fhi * (hi - lo) / (fhi - flo);
    if (bisect || !(x > lo && x < hi)) x = 0.5 * (lo + hi);  // forced, or the secant left the bracket / NaN
    const double fx = f(x);
    if (fx > 0.0) {
      lo = x;
      flo = fx;
      if (side == -1) fhi *= 0.5;
      side = -1;
    } else if (fx < 0.0) {
      hi = x;
      fhi = fx;
      if (side == 1) flo *= 0.5;
      side = 1;
    }
    if (fx == 0.0 || hi - lo <= abs_tol + rel_tol * max2(fabs(lo), fabs(hi))) {
      *ok = true;
      return x;
    }
    if (it % 2 == 1) {
      bisect = hi - lo > 0.5 * width;
      width = hi - lo;
    } else {
      bisect = false;
    }
  }
  return x;
}

// w ∈ Δ minimising ½wᵀAw + cᵀw for the positive definite A of qp (see simplex_matrix), by the
// active-set method, warm-started from the free set and the w of the previous call on the same qp (w
// must then be unchanged): a sequence of problems that differ only in c needs a few corrections each.
// A cold start frees every index (the optimum's support, when the gradients barely conflict), or, when
// A is not positive definite to working precision on it, starts from the best vertex.
template <class Team>
FLATMTL_HD inline Status simplex_qp(ActiveSetQp<Team>& qp, const double* c, double* w) {
  const int K = qp.K;
  const Team& team = qp.team;
  // Every round frees at least one index and lowers the objective; 4K + 16 leaves room for re-freeing.
  const int budget = 4 * K + 16;
  if (qp.n_free > 0) return qp.solve(c, w, budget);
  for (int k = first_owned(team, 0); k < K; k += team.size()) qp.is_free[k] = 1.0;
  if (!qp.start_from(c, w)) {
    int best = 0;
    for (int k = 1; k < K; ++k) {
      const double value = c[k] + 0.5 * qp.A[int64_t(k) * K + k];
      if (value < c[best] + 0.5 * qp.A[int64_t(best) * K + best]) best = k;
    }
    if (owns(team, best)) qp.is_free[best] = 1.0;
    qp.start_from(c, w);
  }
  return qp.iterate(c, w, budget, true);
}

// A = scale · M plus a ridge kQpRidge · A_ii on each diagonal entry (kQpRidge · tr(A)/K for a zero
// row), which makes the inner QPs strictly convex and only picks one w where the optimum is not
// unique. Relative to each task's own ‖g_i‖², it perturbs every task alike: a ridge relative to tr(A)
// would swamp the tasks whose ‖g_i‖² is below about kQpRidge · tr(M) (measured: objectives 1e-7 above
// the reference's when the norms span 1e±3). With A = D^½ (C + kQpRidge I) D^½ for the correlation
// matrix C, the factorisations are as well conditioned as for unit-norm gradients.
template <class Team = SoloTeam>
FLATMTL_HD inline void simplex_matrix(const double* M, int K, double scale, double* A, const Team& team = Team{}) {
  for (int i = first_owned(team, 0); i < K; i += team.size()) {
    for (int j = 0; j < K; ++j) A[int64_t(i) * K + j] = scale * M[int64_t(i) * K + j];
  }
  team.sync();
  const double mean = trace(A, K) / K;
  team.sync();
  for (int i = first_owned(team, 0); i < K; i += team.size()) {
    A[i * K + i] += kQpRidge * (A[i * K + i] > 0.0 ? A[i * K + i] : mean);
  }
  team.sync();
}

// Snaps w onto Δ (the active set keeps 𝟏ᵀw = 1 up to rounding).
template <class Team = SoloTeam>
FLATMTL_HD inline void normalise_on_simplex(double* w, int K, const Team& team = Team{}) {
  double sum = 0.0;
  for (int i = 0; i < K; ++i) sum += w[i];
  team.sync();
  for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = sum > 0.0 ? w[i] / sum : 1.0 / K;
  team.sync();
}

// A certificate the callers can act on: the objective qᵀw + β√(wᵀMw) (squared: + β wᵀMw) at w is not above its
// value at any vertex e_i (q_i + β‖g_i‖, or + β‖g_i‖²) by more than the accuracy of the terms and ``slack`` (the
// resolution the solve stops at). A task gradient ~1e-16 of the others can leave the inner QPs so ill-conditioned
// that the active set stops at a worse point while reporting success; this makes it report failure instead (the
// aggregators then solve with torch).
template <class Team>
FLATMTL_HD inline bool no_vertex_is_better(const double* q, const double* M, int K, double beta, bool squared,
                                           double slack, const double* w, double* scratch, const Team& team) {
  const double quadratic = max2(quad_form(M, K, w, scratch, team), 0.0);
  const double at_w = dot(q, w, K) + beta * (squared ? quadratic : sqrt(quadratic));
  double best = at_w, scale = fabs(at_w);
  for (int i = 0; i < K; ++i) {
    const double norm2 = max2(M[int64_t(i) * K + i], 0.0);
    const double at_vertex = q[i] + beta * (squared ? norm2 : sqrt(norm2));
    best = min2(best, at_vertex);
    scale = max2(scale, fabs(q[i]) + beta * (squared ? norm2 : sqrt(norm2)));
  }
  // 1e-7 of the terms' scale: above the cancellation in qᵀw and the solve's accuracy (~1e-8 of it, CLARABEL's in
  // the reference), far below the failures this is for (a fair fraction of the scale).
  return !(best < at_w - 1e-7 * scale - slack);
}

// Scratch of argmin_linear_plus_norm: A, c, Mw and the active set's.
FLATMTL_HD inline int64_t argmin_work_size(int K) {
  return int64_t(K) * K + 2 * int64_t(K) + ActiveSetQp<>::work_size(K);
}

// w ∈ Δ minimising qᵀw + β √(wᵀMw) (squared: qᵀw + β wᵀMw), β ≥ 0, M PSD.
// work: argmin_work_size(K) doubles.
template <class Team = SoloTeam>
FLATMTL_HD inline Status argmin_linear_plus_norm(const double* q, const double* M, int K, double beta, bool squared,
                                                 double* w, double* work, const Team& team = Team{}) {
  if (K == 1) {  // Δ is one point
    if (owns(team, 0)) w[0] = 1.0;
    team.sync();
    return {0, 1};
  }
  const double tr = trace(M, K);
  const double norm_coef = tr > 0.0 ? beta * (squared ? tr : sqrt(tr)) : 0.0;
  if (norm_coef == 0.0) {
    // Linear objective: uniform over the minimisers of q (a vertex when unique; uniform over ties keeps
    // the result permutation-invariant; all of Δ, hence 𝟏/K, when the objective is zero).
    double q_min = q[0];
    for (int i = 1; i < K; ++i) q_min = min2(q_min, q[i]);
    int ties = 0;
    for (int i = 0; i < K; ++i) ties += q[i] == q_min ? 1 : 0;
    for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = q[i] == q_min ? 1.0 / ties : 0.0;
    team.sync();
    return {0, 1};
  }
  double* A = work;
  double* c = work + int64_t(K) * K;
  double* Mw = c + K;
  ActiveSetQp<Team> qp = ActiveSetQp<Team>::on(A, K, true, Mw + K, team);
  if (squared) {
    simplex_matrix(M, K, 2.0 * beta, A, team);
    Status status = simplex_qp(qp, q, w);
    normalise_on_simplex(w, K, team);
    status.converged &= no_vertex_is_better(q, M, K, beta, squared, 0.0, w, Mw, team);
    return status;
  }
  // ‖x‖ = min_{ρ>0} ‖x‖²/(2ρ) + ρ/2: with r = ρ/β the minimiser for fixed r is
  // w(r) = argmin_Δ ½wᵀMw + r qᵀw, and the optimal r solves φ(r) = ‖g_w(r)‖/r − β = 0, φ nonincreasing
  // (the partial minimum over w is convex in ρ). Consecutive evaluations share the active set.
  simplex_matrix(M, K, 1.0, A, team);
  Status status{0, 1};
  auto phi = [&](double r) {
    team.sync();  // every worker is done with the last c
    for (int i = first_owned(team, 0); i < K; i += team.size()) c[i] = r * q[i];
    team.sync();
    const Status s = simplex_qp(qp, c, w);
    status.iterations += s.iterations;
    status.converged &= s.converged;
    return clamp_sqrt(quad_form(M, K, w, Mw, team)) / r - beta;
  };
  double largest = 0.0;
  for (int i = 0; i < K; ++i) largest = max2(largest, clamp_sqrt(M[i * K + i]));
  const double hi = 2.0 * largest / beta;  // ‖g_w‖ ≤ max‖g_i‖ < βr beyond
  // Below lo the root would give ‖g_w‖ = βr ≤ ¼ kZeroGwRtol max‖g_i‖, which the callers treat as zero
  // (φ(lo) ≤ 0 leaves w(lo) with ‖g_w‖ ≤ β lo); smaller r would only measure the rounding of wᵀMw.
  const double lo = hi * 0.125 * kZeroGwRtol;
  const double flo = phi(lo);
  if (flo > 0.0) {
    bool ok = false;
    find_root(phi, lo, flo, hi, phi(hi), 0.0, 4.0 * kDoubleEps, &ok);
    status.converged &= ok;
  }
  normalise_on_simplex(w, K, team);
  // Stopping at lo leaves ‖g_w‖ ≤ β lo: the objective may be that much above a zero vertex's.
  status.converged &= no_vertex_is_better(q, M, K, beta, squared, beta * lo, w, Mw, team);
  return status;
}

// Whether a combination g = Σ w_i g_i of norm ‖g‖ counts as zero: ‖g‖ ≤ kZeroGwRtol max‖g_i‖ (the reference's
// rule for g_w and for IMGrad's g_m).
FLATMTL_HD inline bool counts_as_zero(double norm, const double* M, int K) {
  double largest = 0.0;
  for (int i = 0; i < K; ++i) largest = max2(largest, M[i * K + i]);
  return !(norm > kZeroGwRtol * clamp_sqrt(largest));
}

// Weights factor · (1/K + λ w) with λ = radius/‖g_w‖, or 0 when g_w counts as zero. Mw: K scratch.
template <class Team = SoloTeam>
FLATMTL_HD inline void conflict_averse_weights(const double* M, int K, double radius, double factor, double* w,
                                               double* Mw, const Team& team = Team{}) {
  const double gw_norm = clamp_sqrt(quad_form(M, K, w, Mw, team));
  const double lam = counts_as_zero(gw_norm, M, K) ? 0.0 : radius / gw_norm;
  for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = factor * (1.0 / K + lam * w[i]);
  team.sync();
}

// b_i = (M𝟏/K)_i = g_i·g₀; returns ‖g₀‖ = √(𝟏ᵀM𝟏)/K.
template <class Team = SoloTeam>
FLATMTL_HD inline double mean_gradient_products(const double* M, int K, double* b, const Team& team = Team{}) {
  for (int i = first_owned(team, 0); i < K; i += team.size()) {
    double s = 0.0;
    for (int j = 0; j < K; ++j) s += M[i * K + j];
    b[i] = s / K;
  }
  team.sync();
  double total = 0.0;
  for (int i = 0; i < K; ++i) total += b[i];
  return clamp_sqrt(total / K);
}

// CAGrad (reference/cagrad.py): w* = argmin_Δ wᵀM𝟏/K + c‖g₀‖√(wᵀMw), weights (1/K + λw*)·s/r.
struct CAGrad : TeamSolver {
  double c;
  int rescale;     // 0: r = 1, 1: r = 1 + c², 2: r = 1 + c
  int sum_scale;   // s = K when set, else 1
  FLATMTL_HD static int64_t work_size(int K) { return int64_t(K) + argmin_work_size(K); }
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    double* b = work;
    const double radius = c * mean_gradient_products(M, K, b, team);
    const Status status = argmin_linear_plus_norm(b, M, K, radius, false, w, work + K, team);
    const double divisor = rescale == 1 ? 1.0 + c * c : rescale == 2 ? 1.0 + c : 1.0;
    team.sync();  // every worker is done with b, which conflict_averse_weights overwrites
    conflict_averse_weights(M, K, radius, (sum_scale ? double(K) : 1.0) / divisor, w, work, team);
    return status;
  }
};

// IMGrad (reference/imgrad.py), both variants, with g_m from MGDA's Frank–Wolfe (defaults) and
// cos θ = cos(g₀, g_m) clipped to [0, 1], 0 when g_m counts as zero (its direction is then rounding).
struct IMGrad : TeamSolver {
  double alpha;
  int paper;  // 0: official variant, 1: the paper's Eq. 11
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) + argmin_work_size(K); }
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    double* b = work;
    double* q = work + K;
    double* scratch = work + 2 * K;
    // g₀·g_m = 𝟏ᵀM w_m / K, ‖g₀‖² = 𝟏ᵀM𝟏/K², ‖g_m‖² = w_mᵀM w_m; the column sums go through q.
    const Mgda mgda{{}, int(MgdaNormalize::None), nullptr, 250, 1e-5};
    mgda(M, K, w, scratch, team);
    for (int j = first_owned(team, 0); j < K; j += team.size()) {
      double col = 0.0;
      for (int i = 0; i < K; ++i) col += M[i * K + j];
      q[j] = col;
    }
    team.sync();
    double total = 0.0, g0_gm = 0.0;
    for (int j = 0; j < K; ++j) {
      total += q[j];
      g0_gm += q[j] * w[j];
    }
    const double gm_norm = clamp_sqrt(quad_form(M, K, w, scratch, team));
    const double norms = sqrt(max2(total, 0.0)) / K * gm_norm;
    const bool defined = norms > 0.0 && !counts_as_zero(gm_norm, M, K);
    const double cos = defined ? min2(max2(g0_gm / K / norms, 0.0), 1.0) : 0.0;
    const double radius = alpha * mean_gradient_products(M, K, b, team);
    for (int i = first_owned(team, 0); i < K; i += team.size()) q[i] = (paper ? 1.0 - cos : 1.5 - cos) * b[i];
    team.sync();
    const Status status = argmin_linear_plus_norm(q, M, K, cos * radius, paper != 0, w, scratch, team);
    conflict_averse_weights(M, K, radius, paper ? 1.0 : K / (1.0 + alpha * alpha), w, scratch, team);
    return status;
  }
};

}  // namespace flatmtl::solvers
