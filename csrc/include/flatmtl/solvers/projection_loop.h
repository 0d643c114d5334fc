// PCGrad and GradVac in Gram form (reference/_projection_loop.py): the working copy g_i' = Σ_k c_k g_k
// of each task is carried as its coefficient row c, every inner product comes from M, and the
// weights are Σ_i c (the column sums of C). The random visiting order is an input: the K x K keys
// the Python side draws from the generator; row i visits j ≠ i by ascending keys[i, j], ties to the
// lower j (torch's stable argsort).
#pragma once

#include "flatmtl/solvers/common.h"
#include "flatmtl/solvers/rows.h"

namespace flatmtl::solvers {

// Task i's loop with a pair rule `rule(i, j, dot, sq_norm_i, sq_norm_j) -> c` (g_i' += c g_j), where
// dot = g_i'·g_j, sq_norm_i = ‖g_i'‖², sq_norm_j = ‖g_j‖², leaving g_i''s coefficients in c (K).
// Rule::kNeedsNormI says whether the rule reads sq_norm_i (only then is it computed: an O(K) product per pair).
// work: 2K doubles (M c, the order; indices < 2^53 are exact in a double).
template <class Rule>
FLATMTL_HD inline void projection_row(const double* M, int K, int i, const double* keys, const Rule& rule, double* c,
                                      double* work) {
  double* v = work;  // M c, kept up to date as c changes
  double* order = work + K;
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
}

// The weights are Σ_i c_i: the tasks' loops are independent (GradVac's row i updates only phi_hat[i, :]),
// so they run row-parallel (rows.h). Self supplies rule(K).
template <class Self>
struct ProjectionRows : RowParallel<Self> {
  FLATMTL_HD static int64_t shared_size(int) { return 0; }
  FLATMTL_HD static int64_t row_work_size(int K) { return 2 * int64_t(K); }
  FLATMTL_HD void prepare(const double*, int, double*, int, int) const {}
  FLATMTL_HD Status row(const double* M, int K, int i, const double*, double* c, double* work) const {
    const Self& self = static_cast<const Self&>(*this);
    projection_row(M, K, i, self.keys, self.rule(K), c, work);
    return {0, 1};
  }
};

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

struct PCGrad : ProjectionRows<PCGrad> {
  const double* keys;  // K x K
  FLATMTL_HD PCGradRule rule(int) const { return {}; }
};

struct GradVac : ProjectionRows<GradVac> {
  const double* keys;  // K x K
  double* phi_hat;     // K x K targets, updated in place
  double beta;
  double eps;
  FLATMTL_HD GradVacRule rule(int K) const { return {phi_hat, K, beta, eps}; }
};

}  // namespace flatmtl::solvers
