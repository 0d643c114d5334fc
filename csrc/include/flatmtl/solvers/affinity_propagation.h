// Affinity propagation (Frey & Dueck 2007) on the K x K similarities M: the algorithm of the torch
// version (flatmtl_fast/solvers/affinity_propagation.py: scikit-learn's AffinityPropagation with a fixed
// tie-breaking noise) operation for operation, with its roundings (an fma where torch.add with alpha
// fuses), but leaving the loop at the first stopping iteration, where the torch version, which must not
// synchronise with the device, runs its whole budget. R's column sums run in index order, torch's CPU
// reduction in an order of its own: the messages may differ in the last bits, which can change labels
// only through a near-tie (the tests find none on thousands of random matrices). Messages that overflow
// (|M| near the largest double) are not reproduced.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

constexpr int kRetryIter = 100;                          // RETRY_ITER: each retry runs this many more iterations
constexpr int64_t kNoiseModulus = 2147483647;            // 2³¹ − 1, the Lehmer generator's modulus
constexpr double kDoubleTiny = 2.2250738585072014e-308;  // DBL_MIN (torch.finfo(float64).tiny)

// a * b and a + b each rounded on its own, as separate tensor operations: nvcc would contract
// a * b + c into one fma, and the tie-breaking noise is on the order of those roundings.
FLATMTL_HD inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

FLATMTL_HD inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// a > b in the order of torch.sort: NaN above everything.
FLATMTL_HD inline bool nan_greater(double a, double b) { return a > b || (isnan(a) && !isnan(b)); }

// The k-th smallest of v[0, n) (torch.sort's order), by quickselect with a three-way partition (equal
// entries cost nothing, e.g. a constant M); v is reordered.
FLATMTL_HD inline double select_kth(double* v, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n;  // v[lo, hi) holds the k-th smallest; v[0, lo) ≤ it ≤ v[hi, n)
  while (hi - lo > 1) {
    const double pivot = v[lo + (hi - lo) / 2];
    int64_t less = lo, i = lo, greater = hi;  // v[lo, less) < pivot = v[less, i), v[greater, hi) > pivot
    while (i < greater) {
      const double x = v[i];
      if (nan_greater(pivot, x)) {
        v[i++] = v[less];
        v[less++] = x;
      } else if (nan_greater(x, pivot)) {
        v[i] = v[--greater];
        v[greater] = x;
      } else {
        ++i;
      }
    }
    if (k < less) {
      hi = less;
    } else if (k >= greater) {
      lo = greater;
    } else {
      return pivot;
    }
  }
  return v[k];
}

// np.median of the n entries of M as the torch version computes it: the mean of the two middle entries
// of the sorted values (NaN last). scratch: n doubles.
FLATMTL_HD inline double np_median(const double* M, int64_t n, double* scratch) {
  for (int64_t e = 0; e < n; ++e) scratch[e] = M[e];
  const double lower = select_kth(scratch, n, (n - 1) / 2);
  return (lower + select_kth(scratch, n, n / 2)) / 2;
}

// Entry e of the tie-breaking pattern (affinity_propagation._noise) for offset = seed K² mod m: Lehmer
// steps and xorshifts of (e + offset) mod m + 1 in int64 (no overflow below 2³¹ · 2¹⁷), mapped to [−1, 1].
FLATMTL_HD inline double tie_noise(int64_t e, int64_t offset) {
  const int64_t multipliers[3] = {48271, 69621, 16807};
  int64_t x = (e + offset) % kNoiseModulus + 1;
  for (int step = 0; step < 3; ++step) {
    x = x * multipliers[step] % kNoiseModulus;
    x ^= x >> 13;
  }
  return double(x) / (double(kNoiseModulus) / 2) - 1.0;
}

// max(x, 0) off the diagonal, x on it (the torch version's floor of −∞ there).
FLATMTL_HD inline double clamp_off_diagonal(double x, bool diagonal) { return diagonal ? x : max2(x, 0.0); }

// torch.argmax of row x with the entries where keep[k] = 0 set to −∞: the first largest.
FLATMTL_HD inline int masked_argmax(const double* x, const double* keep, int K) {
  int best = 0;
  double top = keep[0] ? x[0] : -INFINITY;
  for (int k = 1; k < K; ++k) {
    if (keep[k] && x[k] > top) {
      best = k;
      top = x[k];
    }
  }
  return best;
}

// Each point's exemplar (as a double index in out): itself if it is one (exemplar[i] ≠ 0), else its most
// similar exemplar by row i of S.
FLATMTL_HD inline void assign_exemplars(const double* S, int K, const double* exemplar, double* out) {
  for (int i = 0; i < K; ++i) out[i] = exemplar[i] ? i : masked_argmax(S + int64_t(i) * K, exemplar, K);
}

struct AffinityPropagation : TeamSolver {
  const double* preference;  // K: the diagonal put into M; null: the median of M's entries
  double damping;            // in [0.5, 1)
  int convergence_iter;      // iterations of an unchanged exemplar set that stop the loop
  int max_iter;              // iterations of the first attempt
  int retries;               // attempts after it, each kRetryIter longer, while no exemplar is found
  int64_t seed;              // the tie-breaking noise pattern; < 0: none

  // Scratch: S (M with the preference and the noise), R, A (K² each), column sums and exemplar set (K each).
  FLATMTL_HD static int64_t work_size(int K) { return 3 * int64_t(K) * K + 2 * int64_t(K); }

  // w = the cluster labels (integers as doubles, numbered by their exemplars' indices), or −1 throughout
  // when no exemplar is found or M or the preference is not finite. iterations: those run; converged:
  // the exemplar set met the convergence rule (at an attempt's end it need not: the labels still stand).
  // A team splits the rows of the messages and the columns of their sums; the median and the final
  // refinement run on one worker.
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    const int64_t KK = int64_t(K) * K;
    double* S = work;
    double* R = S + KK;
    double* A = R + KK;
    double* colsum = A + KK;
    double* exemplar = colsum + K;
    for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = -1.0;
    if (K == 1) {  // as the torch version (and scikit-learn): one cluster whatever the preference
      if (owns(team, 0) && isfinite(M[0])) w[0] = 0.0;
      team.sync();
      return {0, 1};
    }
    double common = 0.0;
    if (!preference) {
      on_one_worker(team, [&] {
        colsum[0] = np_median(M, KK, R);
        return Status{0, 1};
      });
      common = colsum[0];
    }
    bool finite = true, off_diagonal_equal = true, preference_equal = true;
    for (int i = 0; i < K; ++i) {
      const double p = preference ? preference[i] : common;
      preference_equal = preference_equal && p == (preference ? preference[0] : common);
      for (int k = 0; k < K; ++k) {
        const double s = i == k ? p : M[i * K + k];
        finite = finite && isfinite(s);
        off_diagonal_equal = off_diagonal_equal && (i == k || s == M[1]);
      }
    }
    if (!finite) {
      team.sync();
      return {0, 0};
    }
    if (off_diagonal_equal && preference_equal) {
      // Degenerate, as scikit-learn: each point its own cluster if the preference exceeds the similarity.
      const bool apart = (preference ? preference[0] : common) > M[K - 1];
      for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = apart ? i : 0;
      team.sync();
      return {0, 1};
    }
    const int64_t offset = seed >= 0 ? (seed % kNoiseModulus) * K % kNoiseModulus * K % kNoiseModulus : 0;
    team.sync();  // every worker has read colsum[0]
    for (int i = first_owned(team, 0); i < K; i += team.size()) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = int64_t(i) * K + k;
        const double s = i == k ? (preference ? preference[i] : common) : M[e];
        S[e] = seed >= 0 ? add_rn(s, mul_rn(add_rn(mul_rn(kDoubleEps, s), kDoubleTiny * 100), tie_noise(e, offset))) : s;
        R[e] = 0.0;
        A[e] = 0.0;
      }
      exemplar[i] = 0.0;
    }
    team.sync();
    // One loop runs every attempt: attempt k repeats attempt k − 1 (same S, same start) up to that one's
    // last iteration, where it stopped nowhere and ended without an exemplar, then goes on. So the first
    // iteration with an exemplar and either a converged set or an attempt's last iteration is where the
    // attempts end, and it is the torch version's "first stopping iteration" of its whole-budget history.
    const int iterations = max_iter + kRetryIter * retries;
    int it = 0, last_change = 0;
    bool converged = false;
    for (; it < iterations; ++it) {
      // R_ik ← S_ik − max_{k' ≠ k} (A + S)_ik', damped; on a tie first = second, so either index works.
      for (int i = first_owned(team, 0); i < K; i += team.size()) {
        const double* s = S + int64_t(i) * K;
        const double* a = A + int64_t(i) * K;
        double* r = R + int64_t(i) * K;
        double first = a[0] + s[0], second = -INFINITY;
        int top = 0;
        for (int k = 1; k < K; ++k) {
          const double v = a[k] + s[k];
          if (v > first) {
            second = first;
            first = v;
            top = k;
          } else if (v > second) {
            second = v;
          }
        }
        // torch.add(R · d, R_new, alpha = 1 − d) is one fma, on the CPU (vectorised) and on CUDA.
        for (int k = 0; k < K; ++k) r[k] = fma(1.0 - damping, s[k] - (k == top ? second : first), r[k] * damping);
      }
      team.sync();
      // A_ik ← min(0, R_kk + Σ_{i' ∉ {i,k}} max(0, R_i'k)) off the diagonal, Σ_{i' ≠ k} max(0, R_i'k) on it:
      // −A_new = max(R⁺_ik − Σ_i' R⁺_i'k, 0) with R⁺ = max(R, 0), both clamps off the diagonal only.
      for (int k = first_owned(team, 0); k < K; k += team.size()) {
        double sum = 0.0;
        for (int i = 0; i < K; ++i) sum += clamp_off_diagonal(R[i * K + k], i == k);
        colsum[k] = sum;
      }
      team.sync();
      for (int i = first_owned(team, 0); i < K; i += team.size()) {
        for (int k = 0; k < K; ++k) {
          const double minus_new = clamp_off_diagonal(clamp_off_diagonal(R[i * K + k], i == k) - colsum[k], i == k);
          A[i * K + k] = fma(damping - 1.0, minus_new, A[i * K + k] * damping);
        }
      }
      team.sync();
      // The exemplars E = {k : A_kk + R_kk > 0}; converged once unchanged for convergence_iter
      // iterations (tested from iteration convergence_iter on), as scikit-learn.
      bool changed = it == 0, found = false;
      for (int k = 0; k < K; ++k) {
        const double e = A[k * K + k] + R[k * K + k] > 0.0 ? 1.0 : 0.0;
        changed = changed || e != exemplar[k];
        found = found || e != 0.0;
      }
      team.sync();  // every worker has read the last exemplar set
      for (int k = first_owned(team, 0); k < K; k += team.size()) {
        exemplar[k] = A[k * K + k] + R[k * K + k] > 0.0 ? 1.0 : 0.0;
      }
      if (changed) last_change = it;
      converged = it >= convergence_iter && it - last_change + 1 >= convergence_iter;
      const bool attempt_end = it >= max_iter - 1 && (it - (max_iter - 1)) % kRetryIter == 0;
      if (found && (converged || attempt_end)) break;
    }
    team.sync();
    if (it == iterations) return {iterations, 0};  // no exemplar: every label −1

    on_one_worker(team, [&] {
      refine(S, K, exemplar, w, R, colsum);
      return Status{0, 1};
    });
    return {it + 1, converged ? 1 : 0};
  }

  // The labels from the exemplar set, into w. scratch: 2K (member, total), refined: K.
  FLATMTL_HD static void refine(const double* S, int K, const double* exemplar, double* w, double* scratch,
                                double* refined) {
    // Refinement: in each cluster, the member k with the largest Σ_{i in the cluster} S_ik (summed in
    // index order, as BLAS sums member · S) becomes the exemplar; points are then reassigned.
    double* cluster = w;
    double* member = scratch;
    double* total = scratch + K;
    assign_exemplars(S, K, exemplar, cluster);
    for (int k = 0; k < K; ++k) refined[k] = 0.0;
    for (int e = 0; e < K; ++e) {
      if (!exemplar[e]) continue;
      for (int k = 0; k < K; ++k) {
        member[k] = cluster[k] == e ? 1.0 : 0.0;
        total[k] = 0.0;
      }
      for (int i = 0; i < K; ++i) {
        if (!member[i]) continue;
        for (int k = 0; k < K; ++k) total[k] += S[i * K + k];
      }
      refined[masked_argmax(total, member, K)] = 1.0;
    }
    // Clusters numbered by their exemplars' indices (the torch version's cumsum, np.unique in scikit-learn).
    double* number = member;
    for (int k = 0, count = 0; k < K; ++k) number[k] = refined[k] ? count++ : -1.0;
    assign_exemplars(S, K, refined, cluster);
    for (int i = 0; i < K; ++i) w[i] = number[int(cluster[i])];
  }
};

}  // namespace flatmtl::solvers
