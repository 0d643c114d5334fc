// IMTL-G closed form from the Gram (reference/imtlg.py): α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁺ with the
// reference's pseudo-inverse cut-off (singular values ≤ 4 K eps max‖g_i‖ dropped), α_1 = 1 − Σ α_{2:K}.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// One-sided Jacobi (Hestenes) SVD of an n x n matrix A given by its transpose B = Aᵀ (row-major, so
// A's columns are B's contiguous rows), in place: on return row k of B is σ_k U_k and row k of W is
// the right singular vector V_k (A V = U Σ). Accurate to rounding for the small singular values too
// (unlike an eigen-decomposition of AᵀA), which the cut-off needs. Returns the sweeps used and
// whether the rows became orthogonal within max_sweeps.
FLATMTL_HD inline Status jacobi_svd(double* B, int n, double* W, int max_sweeps) {
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) W[i * n + j] = i == j ? 1.0 : 0.0;
  }
  // Rows below eps ‖A‖_F are rounding noise: rotating them against the others can cycle at the
  // rounding level, and IMTL-G's cut-off 4 K eps max‖g_i‖ ≥ eps ‖A‖_F (|A_ij| ≤ 4 max‖g_i‖) drops them.
  const double noise = kDoubleEps * kDoubleEps * dot(B, B, n * n);
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < n - 1; ++p) {
      double* bp = B + p * n;
      double* wp = W + p * n;
      for (int q = p + 1; q < n; ++q) {
        double* bq = B + q * n;
        double* wq = W + q * n;
        const double app = dot(bp, bp, n), aqq = dot(bq, bq, n), apq = dot(bp, bq, n);
        if (!(fabs(apq) > kDoubleEps * sqrt(app * aqq)) || min2(app, aqq) <= noise) continue;  // or NaN
        rotated = true;
        const double zeta = (aqq - app) / (2.0 * apq);
        const double t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
        const double cs = 1.0 / sqrt(1.0 + t * t), sn = cs * t;
        for (int r = 0; r < n; ++r) {
          const double x = bp[r], y = bq[r];
          bp[r] = cs * x - sn * y;
          bq[r] = sn * x + cs * y;
          const double vx = wp[r], vy = wq[r];
          wp[r] = cs * vx - sn * vy;
          wq[r] = sn * vx + cs * vy;
        }
      }
    }
    if (!rotated) return {sweep, 1};
  }
  return {max_sweeps, 0};
}

struct Imtlg {
  // Unit roundoff of the gradients' dtype in the cut-off (the reference uses M's dtype).
  double dtype_eps;
  static constexpr int kMaxSweeps = 64;

  // Scratch: s (K), b (K), Aᵀ and V ((K−1)²) each.
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) + 2 * int64_t(K - 1) * (K - 1); }

  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    const int n = K - 1;
    double* s = work;  // 1/‖g_j‖, or 0 for a zero row
    double* b = work + K;
    double* At = work + 2 * K;  // (D Uᵀ)ᵀ
    double* V = At + int64_t(n) * n;
    double max_norm = 0.0;
    for (int j = 0; j < K; ++j) {
      const double norm = clamp_sqrt(M[j * K + j]);
      s[j] = norm > 0.0 ? 1.0 / norm : 0.0;
      max_norm = max2(max_norm, norm);
    }
    // g_i·u_j = M_ij s_j: b_j = (g_1 Uᵀ)_j, A_ij = (D Uᵀ)_ij with the reference's grouping of terms.
    const double m00 = M[0] * s[0];
    for (int j = 1; j < K; ++j) b[j - 1] = m00 - M[j] * s[j];
    for (int i = 1; i < K; ++i) {
      for (int j = 1; j < K; ++j) {
        At[(j - 1) * n + (i - 1)] = (m00 - M[i * K] * s[0]) - (M[j] * s[j] - M[i * K + j] * s[j]);
      }
    }
    const Status status = jacobi_svd(At, n, V, kMaxSweeps);
    // rest = b A⁺ = Σ_k (b·V_k)/σ_k U_kᵀ over σ_k > cutoff; row k of At now holds σ_k U_k.
    const double cutoff = 4.0 * K * dtype_eps * max_norm;
    for (int j = 0; j < K; ++j) w[j] = 0.0;
    for (int k = 0; k < n; ++k) {
      const double* uk = At + int64_t(k) * n;
      const double sigma = sqrt(dot(uk, uk, n));
      if (!(sigma > cutoff)) continue;
      const double coef = dot(b, V + int64_t(k) * n, n) / (sigma * sigma);
      for (int r = 0; r < n; ++r) w[r + 1] += coef * uk[r];
    }
    double rest = 0.0;
    for (int j = 1; j < K; ++j) rest += w[j];
    w[0] = 1.0 - rest;
    return status;
  }
};

}  // namespace flatmtl::solvers
