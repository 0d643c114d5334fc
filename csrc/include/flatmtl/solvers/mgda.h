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
// keeping the current point) when the L1 length of the step would be below stop_crit.
// work: K doubles.
FLATMTL_HD inline Status min_norm_weights(const double* M, int K, int max_iter, double stop_crit, double* w,
                                          double* work) {
  for (int k = 0; k < K; ++k) w[k] = 0.0;
  if (K == 1) {
    w[0] = 1.0;
    return {0, 1};
  }
  double best_cost = INFINITY, best_gamma = 0.0;
  int bi = 0, bj = 0;
  for (int i = 0; i < K; ++i) {
    for (int j = i + 1; j < K; ++j) {
      const double mii = M[i * K + i], mij = M[i * K + j], mjj = M[j * K + j];
      const double g = line_min(mii, mij, mjj);
      const double cost = (1 - g) * (1 - g) * mii + 2 * g * (1 - g) * mij + g * g * mjj;
      if (cost < best_cost) {
        best_cost = cost;
        bi = i;
        bj = j;
        best_gamma = g;
      }
    }
  }
  w[bi] = 1.0 - best_gamma;
  w[bj] = best_gamma;  // after w[bi], as the reference (matters only when no pair was finite)
  // M w is updated with each step, M w ← (1−γ) M w + γ M_t (O(K) instead of a product per step); the
  // running sum drifts from a fresh product by O(steps · eps) relative, the size of the differences
  // in summation order the reference's own product already has.
  double* Mw = work;
  matvec(M, K, w, Mw);
  for (int it = 0; it < max_iter; ++it) {
    int t = 0;
    for (int k = 1; k < K; ++k) {
      if (Mw[k] < Mw[t]) t = k;  // first minimum, as torch.argmin
    }
    const double gamma = line_min(dot(w, Mw, K), Mw[t], M[t * K + t]);
    double change = 0.0;
    for (int k = 0; k < K; ++k) change += fabs((k == t ? gamma : 0.0) - gamma * w[k]);
    if (change < stop_crit) return {it, 1};
    const double* mt = M + int64_t(t) * K;
    for (int k = 0; k < K; ++k) {
      w[k] += (k == t ? gamma : 0.0) - gamma * w[k];
      Mw[k] += gamma * (mt[k] - Mw[k]);
    }
  }
  return {max_iter, 0};
}

struct Mgda {
  int normalize;         // MgdaNormalize
  const double* losses;  // K task losses; read only for Loss / LossPlus
  int max_iter;
  double stop_crit;

  // Scratch: D (K) and the rescaled Gram (K²) plus Frank–Wolfe's K.
  FLATMTL_HD static int64_t work_size(int K) { return int64_t(K) * K + 2 * int64_t(K); }

  // w = min_norm_weights(D⁻¹MD⁻¹) / D with D_i = 1, ‖g_i‖, L_i or L_i‖g_i‖ (D_i ≤ 0 → 1).
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    double* D = work;
    double* scaled = work + K;
    for (int i = 0; i < K; ++i) {
      const double norm = clamp_sqrt(M[i * K + i]);
      double d = 1.0;
      if (normalize == int(MgdaNormalize::L2)) d = norm;
      if (normalize == int(MgdaNormalize::Loss)) d = losses[i];
      if (normalize == int(MgdaNormalize::LossPlus)) d = losses[i] * norm;
      D[i] = d > 0.0 ? d : 1.0;
    }
    for (int i = 0; i < K; ++i) {
      for (int j = 0; j < K; ++j) scaled[i * K + j] = M[i * K + j] / (D[i] * D[j]);
    }
    const Status status = min_norm_weights(scaled, K, max_iter, stop_crit, w, scaled + int64_t(K) * K);
    for (int i = 0; i < K; ++i) w[i] /= D[i];
    return status;
  }
};

}  // namespace flatmtl::solvers
