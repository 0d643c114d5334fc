// Python bindings of the K x K solvers (csrc/include/flatmtl/solvers/). Arguments are raw addresses
// (Tensor.data_ptr()) of contiguous float64 tensors: M (K x K), w (K), work (solve_<name>_work_size(K)
// doubles) and each method's own inputs/state; the Python layer checks devices, dtypes and shapes.
// Every solver is bound twice from one definition: solve_<name> (CPU, GIL released, returns
// (iterations, converged)) and, with CUDA, cuda_solve_<name> (asynchronous on `stream`, writes
// {iterations, converged} to an optional int32 device buffer `status`).
#include "flatmtl/solvers_bindings.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "flatmtl/solvers/solvers.h"
#include "flatmtl/solvers/thread_team.h"

namespace py = pybind11;
namespace sv = flatmtl::solvers;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flatmtl_fast._C solver: " + what);
}

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <class Problem>
void check_buffers(uintptr_t M, int64_t K, uintptr_t w, uintptr_t work) {
  require(K >= 1 && K <= sv::kMaxK, "K must be in [1, " + std::to_string(sv::kMaxK) + "], got " + std::to_string(K));
  require(M != 0, "M is a null pointer");
  require(w != 0, "w is a null pointer");
  require(work != 0 || Problem::work_size(int(K)) == 0, "work is a null pointer");
}

// Binds solve_<name> (and cuda_solve_<name>) for the solver built by make(K, params...). Each takes a last
// argument nan_if_nonfinite (default false): apply the non-finite policy of solve_as_kernel (solvers.h).
template <class Problem, class... Params, class... Names>
void def_solver(py::module_& m, const std::string& name, Problem (*make)(int64_t, Params...), const char* doc,
                Names... names) {
  m.def(("solve_" + name + "_work_size").c_str(), [](int64_t K) { return Problem::work_size(int(K)); }, py::arg("K"),
        "Scratch doubles the solver needs for K tasks.");
  m.def(
      ("solve_" + name).c_str(),
      [make](uintptr_t M, int64_t K, Params... params, uintptr_t w, uintptr_t work, bool nan_if_nonfinite) {
        check_buffers<Problem>(M, K, w, work);
        const Problem problem = make(K, params...);
        sv::Status status;
        {
          py::gil_scoped_release release;
          // One worker runs what the kernel runs (staging aside): the non-finite policy included.
          std::vector<double> zeros(nan_if_nonfinite ? size_t(K * K) : 0);
          status = sv::solve_as_kernel(problem, ptr<const double>(M), int(K), ptr<double>(w), ptr<double>(work),
                                       nullptr, zeros.data(), nan_if_nonfinite, 1, sv::SoloTeam{});
        }
        return py::make_tuple(status.iterations, bool(status.converged));
      },
      py::arg("M"), py::arg("K"), names..., py::arg("w"), py::arg("work"), py::arg("nan_if_nonfinite") = false, doc);
  // Row-parallel solvers (K independent per-task problems) gain from CPU threads; a team solver's barriers cost
  // more on CPU threads than its splits save, so only the former are threaded on the CPU.
  m.attr(("solve_" + name + "_row_parallel").c_str()) = sv::is_row_parallel<Problem>;
  if constexpr (sv::is_row_parallel<Problem> || sv::is_team_solver<Problem>) {
    // A team solver takes the scratch of a single worker and all the threads (lanes = threads).
    m.def(
        ("solve_" + name + "_threaded_work_size").c_str(),
        [](int64_t K, int lanes) {
          if constexpr (sv::is_row_parallel<Problem>) return sv::rows_work_size<Problem>(int(K), lanes);
          return Problem::work_size(int(K));
        },
        py::arg("K"), py::arg("lanes"), "Scratch doubles of solve_<name>_threaded with `lanes` workers.");
    m.def(
        ("solve_" + name + "_threaded").c_str(),
        [make](uintptr_t M, int64_t K, Params... params, uintptr_t w, uintptr_t work, int threads, int lanes,
               bool nan_if_nonfinite) {
          check_buffers<Problem>(M, K, w, work);
          require(threads >= 1 && threads <= sv::cuda::kBlockThreads,
                  "threads must be in [1, " + std::to_string(sv::cuda::kBlockThreads) + "]");
          require(lanes >= 1 && lanes <= threads, "lanes must be in [1, threads]");
          require(sv::is_row_parallel<Problem> || lanes == threads, "a team solver takes lanes = threads");
          const Problem problem = make(K, params...);
          sv::Status status;
          {
            py::gil_scoped_release release;
            status = sv::solve_threaded(problem, ptr<const double>(M), int(K), ptr<double>(w), ptr<double>(work),
                                        threads, lanes, nan_if_nonfinite);
          }
          return py::make_tuple(status.iterations, bool(status.converged));
        },
        py::arg("M"), py::arg("K"), names..., py::arg("w"), py::arg("work"), py::arg("threads"), py::arg("lanes"),
        py::arg("nan_if_nonfinite") = false,
        "The solve spread over `threads` CPU threads (a row-parallel one's tasks over `lanes` of them), as the CUDA "
        "kernel runs it.");
  }
#ifdef FLATMTL_WITH_CUDA
  m.def(("cuda_solve_" + name + "_work_size").c_str(), [](int64_t K) { return sv::cuda::work_size<Problem>(int(K)); },
        py::arg("K"), "Scratch doubles the CUDA solver needs for K tasks.");
  m.def(
      ("cuda_solve_" + name).c_str(),
      [make](uintptr_t M, int64_t K, Params... params, uintptr_t w, uintptr_t work, uintptr_t status, int device,
             uintptr_t stream, bool nan_if_nonfinite) {
        check_buffers<Problem>(M, K, w, work);
        const std::string error =
            sv::cuda::launch(make(K, params...), ptr<const double>(M), int(K), ptr<double>(w), ptr<double>(work),
                             ptr<int>(status), nan_if_nonfinite, device, stream);
        if (!error.empty()) throw std::runtime_error("flatmtl_fast CUDA backend: " + error);
      },
      py::arg("M"), py::arg("K"), names..., py::arg("w"), py::arg("work"), py::arg("status"), py::arg("device"),
      py::arg("stream"), py::arg("nan_if_nonfinite") = false, doc);
#endif
}

sv::Mean make_mean(int64_t) { return {}; }
sv::Sum make_sum(int64_t) { return {}; }

sv::Mgda make_mgda(int64_t, int normalize, uintptr_t losses, int max_iter, double stop_crit) {
  require(normalize >= 0 && normalize <= 3, "normalize must be 0 (none), 1 (l2), 2 (loss) or 3 (loss+)");
  require(normalize < 2 || losses != 0, "losses is a null pointer (normalize 'loss' / 'loss+' needs them)");
  require(max_iter >= 0, "max_iter must be >= 0");
  require(stop_crit > 0, "stop_crit must be > 0");
  return {{}, normalize, ptr<const double>(losses), max_iter, stop_crit};
}

sv::PCGrad make_pcgrad(int64_t, uintptr_t keys) {
  require(keys != 0, "keys is a null pointer");
  return {{}, ptr<const double>(keys)};
}

sv::GradVac make_gradvac(int64_t, uintptr_t keys, uintptr_t phi_hat, double beta, double eps) {
  require(keys != 0, "keys is a null pointer");
  require(phi_hat != 0, "phi_hat is a null pointer");
  require(beta >= 0 && beta <= 1, "beta must be in [0, 1]");
  require(eps >= 0, "eps must be >= 0");
  return {{}, ptr<const double>(keys), ptr<double>(phi_hat), beta, eps};
}

sv::Imtlg make_imtlg(int64_t, double dtype_eps) {
  require(dtype_eps > 0, "dtype_eps must be > 0");
  return {{}, dtype_eps};
}

sv::AlignedMtl make_aligned_mtl(int64_t, double rank_eps) {
  require(rank_eps > 0, "rank_eps must be > 0");
  return {{}, rank_eps};
}

template <class Problem>
Problem make_dual_cone(int64_t, uintptr_t pref, double norm_eps, double reg_eps) {
  require(norm_eps >= 0, "norm_eps must be >= 0");
  require(reg_eps > 0, "reg_eps must be > 0");
  Problem problem{};  // UPGrad has a base (row-parallel), DualProj none: set the members by name
  problem.pref = ptr<const double>(pref);
  problem.norm_eps = norm_eps;
  problem.reg_eps = reg_eps;
  return problem;
}

sv::NashMtl make_nash(int64_t, uintptr_t alpha, int max_iter, double max_norm, bool update, double gram_eps) {
  require(alpha != 0, "alpha is a null pointer");
  require(max_iter >= 1, "max_iter must be >= 1");
  require(max_norm >= 0, "max_norm must be >= 0");
  require(gram_eps >= 0 && gram_eps < 1, "gram_eps must be in [0, 1)");
  return {{}, ptr<double>(alpha), max_iter, max_norm, update ? 1 : 0, gram_eps};
}

sv::FairGrad make_fairgrad(int64_t, double alpha, double gram_eps) {
  require(alpha > 0, "alpha must be > 0");
  require(gram_eps >= 0 && gram_eps < 1, "gram_eps must be in [0, 1)");
  return {{}, alpha, gram_eps};
}

sv::CAGrad make_cagrad(int64_t, double c, int rescale, bool sum_scale) {
  require(c >= 0, "c must be >= 0");
  require(rescale >= 0 && rescale <= 2, "rescale must be 0, 1 or 2");
  return {{}, c, rescale, sum_scale ? 1 : 0};
}

sv::IMGrad make_imgrad(int64_t, double alpha, bool paper) {
  require(alpha >= 0, "alpha must be >= 0");
  return {{}, alpha, paper ? 1 : 0};
}

sv::AffinityPropagation make_affinity_propagation(int64_t, uintptr_t preference, double damping, int convergence_iter,
                                                  int max_iter, int retries, int64_t seed) {
  require(damping >= 0.5 && damping < 1, "damping must be in [0.5, 1)");
  require(convergence_iter >= 1, "convergence_iter must be >= 1");
  require(max_iter >= 1, "max_iter must be >= 1");
  require(retries >= 0 && max_iter + int64_t(sv::kRetryIter) * retries <= INT32_MAX,
          "retries must be >= 0, with max_iter + 100 retries in int range");
  return {{}, ptr<const double>(preference), damping, convergence_iter, max_iter, retries, seed};
}

}  // namespace

namespace flatmtl {

void bind_solvers(py::module_& m) {
  m.attr("solver_max_k") = sv::kMaxK;  // the largest K every solver accepts
  def_solver(m, "mean", &make_mean, "w = 1/K.");
  def_solver(m, "sum", &make_sum, "w = 1.");
  def_solver(m, "mgda", &make_mgda, "MGDA Frank-Wolfe weights on the raw rows (reference MGDA.weights).",
             py::arg("normalize"), py::arg("losses"), py::arg("max_iter"), py::arg("stop_crit"));
  def_solver(m, "pcgrad", &make_pcgrad, "PCGrad weights; keys (K x K) fix the visiting orders.", py::arg("keys"));
  def_solver(m, "gradvac", &make_gradvac, "GradVac weights; phi_hat (K x K) is updated in place.", py::arg("keys"),
             py::arg("phi_hat"), py::arg("beta"), py::arg("eps"));
  def_solver(m, "imtlg", &make_imtlg, "IMTL-G closed form; dtype_eps: unit roundoff in the pinv cut-off.",
             py::arg("dtype_eps"));
  def_solver(m, "aligned_mtl", &make_aligned_mtl,
             "Aligned-MTL w = B1; rank_eps: unit roundoff in the rank cut-off (lambda > lambda_max K rank_eps).",
             py::arg("rank_eps"));
  def_solver(m, "upgrad", &make_dual_cone<sv::UPGrad>, "UPGrad weights (pref 0: 1/K).", py::arg("pref"),
             py::arg("norm_eps"), py::arg("reg_eps"));
  def_solver(m, "dualproj", &make_dual_cone<sv::DualProj>, "DualProj weights (pref 0: 1/K).", py::arg("pref"),
             py::arg("norm_eps"), py::arg("reg_eps"));
  def_solver(m, "nash_mtl", &make_nash,
             "Nash-MTL weights; alpha (K) is the warm start, updated in place; gram_eps: M's unit roundoff.",
             py::arg("alpha"), py::arg("max_iter"), py::arg("max_norm"), py::arg("update"), py::arg("gram_eps"));
  def_solver(m, "fairgrad", &make_fairgrad,
             "FairGrad weights: w > 0 with M w = w^(-1/alpha), else 1/K; gram_eps: M's unit roundoff.",
             py::arg("alpha"), py::arg("gram_eps"));
  def_solver(m, "cagrad", &make_cagrad, "CAGrad weights (1/K + lambda w*) s / r.", py::arg("c"), py::arg("rescale"),
             py::arg("sum_scale"));
  def_solver(m, "imgrad", &make_imgrad, "IMGrad weights; paper selects Eq. 11 over the official variant.",
             py::arg("alpha"), py::arg("paper"));
  def_solver(m, "affinity_propagation", &make_affinity_propagation,
             "Affinity-propagation cluster labels of M's points in w (all -1: none); preference 0: the median of M.",
             py::arg("preference"), py::arg("damping"), py::arg("convergence_iter"), py::arg("max_iter"),
             py::arg("retries"), py::arg("seed"));
}

}  // namespace flatmtl
