// PCGrad and GradVac in Gram form (reference/_projection_loop.py): the working copy g_i' = Σ_k c_k g_k
// of each task is carried as its coefficient row c, every inner product comes from M, and the
// weights are Σ_i c (the column sums of C). The random visiting order is an input: the K x K keys
// the Python side draws from the generator; row i visits j ≠ i by ascending keys[i, j], ties to the
// lower j (torch's stable argsort).
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// Runs the loop with a pair rule `rule(i, j, dot, sq_norm_i, sq_norm_j) -> c` (g_i' += c g_j), where
// dot = g_i'·g_j, sq_norm_i = ‖g_i'‖², sq_norm_j = ‖g_j‖². Rule::kNeedsNormI says whether the rule
// reads sq_norm_i (only then is it computed: an O(K) product per pair).
// work: 3K doubles (c, M c, the order; indices < 2^53 are exact in a double).
template <class Rule>
FLATMTL_HD inline Status projection_loop(const double* M, int K, const double* keys, Rule& rule, double* w,
                                         double* work) {
  double* c = work;
  double* v = work + K;  // M c, kept up to date as c changes
  double* order = work + 2 * K;
  for (int k = 0; k < K; ++k) w[k] = 0.0;
  for (int i = 0; i < K; ++i) {
    // Stable insertion sort of j ≠ i by keys[i, j].
    int n = 0;
    for (int j = 0; j < K; ++j) {
      if (j == i) continue;
      int pos = n++;
      while (pos > 0 && keys[i * K + int(order[pos - 1])] > keys[i * K + j]) {
        order[pos] = order[pos - 1];
        --pos;
      }
      order[pos] = j;
    }
    for (int k = 0; k < K; ++k) {
      c[k] = k == i ? 1.0 : 0.0;
      v[k] = M[i * K + k];  // M symmetric: rows are columns, read contiguously
    }
    for (int step = 0; step < n; ++step) {
      const int j = int(order[step]);
      const double sq_norm_i = Rule::kNeedsNormI ? dot(c, v, K) : 0.0;
      const double coef = rule(i, j, v[j], sq_norm_i, M[j * K + j]);
      if (coef != 0.0) {
        c[j] += coef;
        for (int k = 0; k < K; ++k) v[k] += coef * M[j * K + k];
      }
    }
    for (int k = 0; k < K; ++k) w[k] += c[k];
  }
  return {0, 1};
}

struct PCGradRule {
  static constexpr bool kNeedsNormI = false;
  // Remove the component along g_j only on conflict; a zero g_j (M_jj = 0) is never projected on.
  FLATMTL_HD double operator()(int, int, double dot, double, double sq_norm_j) const {
    return dot < 0.0 && sq_norm_j > 0.0 ? -dot / sq_norm_j : 0.0;
  }
};

// GradVac's rule with its EMA cosine targets phi_hat (K x K, updated in place for every visited pair).
struct GradVacRule {
  static constexpr bool kNeedsNormI = true;
  double* phi_hat;
  int K;
  double beta;
  double eps;

  FLATMTL_HD double operator()(int i, int j, double dot, double sq_norm_i, double sq_norm_j) const {
    const double norm_i = clamp_sqrt(sq_norm_i), norm_j = clamp_sqrt(sq_norm_j);
    const double cos_denominator = norm_i * norm_j + eps;
    const double phi = cos_denominator > 0.0 ? dot / cos_denominator : 0.0;
    const double target = phi_hat[i * K + j];
    double c = 0.0;
    if (phi < target) {
      const double sin_phi = clamp_sqrt(1.0 - phi * phi), sin_target = clamp_sqrt(1.0 - target * target);
      const double denominator = norm_j * sin_target + eps;
      if (denominator > 0.0) c = norm_i * (target * sin_phi - phi * sin_target) / denominator;
    }
    phi_hat[i * K + j] = (1.0 - beta) * target + beta * phi;
    return c;
  }
};

struct PCGrad {
  const double* keys;  // K x K
  FLATMTL_HD static int64_t work_size(int K) { return 3 * int64_t(K); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    PCGradRule rule;
    return projection_loop(M, K, keys, rule, w, work);
  }
};

struct GradVac {
  const double* keys;  // K x K
  double* phi_hat;     // K x K targets, updated in place
  double beta;
  double eps;
  FLATMTL_HD static int64_t work_size(int K) { return 3 * int64_t(K); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    GradVacRule rule{phi_hat, K, beta, eps};
    return projection_loop(M, K, keys, rule, w, work);
  }
};

}  // namespace flatmtl::solvers
