// MGDA min-norm weights: the official Frank–Wolfe (MinNormSolver.find_min_norm_element_FW) exactly as
// flatmtl_fast/reference/_simplex.py runs it, with the l2 / loss / loss+ normalisations of
// reference/mgda.py applied as the diagonal rescaling D⁻¹ M D⁻¹.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

enum class MgdaNormalize : int { None = 0, L2 = 1, Loss = 2, LossPlus = 3 };

// γ ∈ [0, 1] minimising ‖(1−γ)v + γt‖² from vv, vt, tt; the branches avoid 0/0 when v = t.
FLATMTL_HD inline double line_min(double vv, double vt, double tt) {
  if (vt >= vv) return 0.0;
  if (vt >= tt) return 1.0;
  return (vv - vt) / (vv - 2.0 * vt + tt);
}

// w ∈ Δ minimising wᵀMw: best-pair start, then at most max_iter Frank–Wolfe steps, stopping (and
// keeping the current point) when the L1 length of the step would be below stop_crit. A team splits the
// pairs and the entries of each step; every worker takes the step's scalars itself.
// work: 3K doubles.
template <class Team = SoloTeam>
FLATMTL_HD inline Status min_norm_weights(const double* M, int K, int max_iter, double stop_crit, double* w,
                                          double* work, const Team& team = Team{}) {
  for (int k = first_owned(team, 0); k < K; k += team.size()) w[k] = 0.0;
  if (K == 1) {
    if (owns(team, 0)) w[0] = 1.0;
    team.sync();
    return {0, 1};
  }
  // The first pair (in row-major order) of least cost; none when no cost is finite (then w = 0, as the
  // reference, which writes w[0] = 1 − 0 and then w[0] = 0).
  double best_cost = INFINITY;
  int best = -1;
  for (int i = first_owned(team, 0); i < K; i += team.size()) {
    for (int j = i + 1; j < K; ++j) {
      const double mii = M[i * K + i], mij = M[i * K + j], mjj = M[j * K + j];
      const double g = line_min(mii, mij, mjj);
      const double cost = (1 - g) * (1 - g) * mii + 2 * g * (1 - g) * mij + g * g * mjj;
      if (cost < best_cost) {
        best_cost = cost;
        best = i * K + j;
      }
    }
  }
  best = team_first_min(team, best_cost, best);
  team.sync();  // w is zero
  if (best >= 0) {
    const int bi = best / K, bj = best % K;
    const double gamma = line_min(M[bi * K + bi], M[bi * K + bj], M[bj * K + bj]);
    if (owns(team, bi)) w[bi] = 1.0 - gamma;
    if (owns(team, bj)) w[bj] = gamma;
  }
  // M w is updated with each step, M w ← (1−γ) M w + γ M_t (O(K) instead of a product per step); the
  // running sum drifts from a fresh product by O(steps · eps) relative, the size of the differences
  // in summation order the reference's own product already has.
  double* Mw = work;
  team.sync();
  matvec(M, K, w, Mw, team);
  // Each step reads the current (w, M w) and writes the next into the other buffers: one barrier a step.
  double* current_w = w;
  double* next_w = work + 2 * K;
  double* next_Mw = work + K;
  Status status{max_iter, 0};
  for (int it = 0; it < max_iter; ++it) {
    int t = 0;
    for (int k = 1; k < K; ++k) {
      if (Mw[k] < Mw[t]) t = k;  // first minimum, as torch.argmin
    }
    const double gamma = line_min(dot(current_w, Mw, K), Mw[t], M[t * K + t]);
    double change = 0.0;
    for (int k = 0; k < K; ++k) change += fabs((k == t ? gamma : 0.0) - gamma * current_w[k]);
    if (change < stop_crit) {
      status = {it, 1};
      break;
    }
    const double* mt = M + int64_t(t) * K;
    for (int k = first_owned(team, 0); k < K; k += team.size()) {
      next_w[k] = current_w[k] + ((k == t ? gamma : 0.0) - gamma * current_w[k]);
      next_Mw[k] = Mw[k] + gamma * (mt[k] - Mw[k]);
    }
    team.sync();
    double* const old_w = current_w;
    double* const old_Mw = Mw;
    current_w = next_w;
    Mw = next_Mw;
    next_w = old_w;
    next_Mw = old_Mw;
  }
  if (current_w != w) {
    for (int k = first_owned(team, 0); k < K; k += team.size()) w[k] = current_w[k];
  }
  team.sync();
  return status;
}

struct Mgda : TeamSolver {
  int normalize;         // MgdaNormalize
  const double* losses;  // K task losses; read only for Loss / LossPlus
  int max_iter;
  double stop_crit;

  // Scratch: D (K) and the rescaled Gram (K²) plus Frank–Wolfe's 3K.
  FLATMTL_HD static int64_t work_size(int K) { return int64_t(K) * K + 4 * int64_t(K); }

  // w = min_norm_weights(D⁻¹MD⁻¹) / D with D_i = 1, ‖g_i‖, L_i or L_i‖g_i‖ (D_i ≤ 0 → 1).
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    double* D = work;
    double* scaled = work + K;
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      const double norm = clamp_sqrt(M[i * K + i]);
      double d = 1.0;
      if (normalize == int(MgdaNormalize::L2)) d = norm;
      if (normalize == int(MgdaNormalize::Loss)) d = losses[i];
      if (normalize == int(MgdaNormalize::LossPlus)) d = losses[i] * norm;
      D[i] = d > 0.0 ? d : 1.0;
    }
    team.sync();
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      for (int j = 0; j < K; ++j) scaled[i * K + j] = M[i * K + j] / (D[i] * D[j]);
    }
    team.sync();
    const Status status = min_norm_weights(scaled, K, max_iter, stop_crit, w, scaled + int64_t(K) * K, team);
    for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] /= D[i];
    team.sync();
    return status;
  }
};

}  // namespace flatmtl::solvers
