// The K x K solvers as single-block kernels: the same header code the CPU module runs, after the block
// stages M in shared memory (K ≤ kMaxStagedK). Row-parallel solvers (rows.h) give each thread its share of
// the tasks, team solvers (team.h) run on the whole block; the others run in thread 0.
// No allocation and no host synchronisation: the caller passes every buffer and the stream.
#include <cuda_runtime.h>

#include "flatmtl/solvers/solvers.h"

namespace flatmtl::solvers::cuda {
namespace {

constexpr int kThreads = kBlockThreads;

struct BlockTeam {
  double* shared_slots;  // 2 kThreads doubles of shared memory
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ double* slots() const { return shared_slots; }
};

// zeros: solver_work_size(K) doubles into work, where an unstaged non-finite M is replaced (common.h's policy).
template <class Problem>
__global__ void __launch_bounds__(kThreads)
    solve_kernel(Problem problem, const double* __restrict__ M, int K, double* w, double* work, double* zeros,
                 int* status, bool nan_if_nonfinite, int lanes) {
  extern __shared__ double staged[];
  __shared__ double slots[2 * kThreads];
  const int KK = K * K;
  // Uniform over the block (a kernel argument, then a block-wide vote), so every thread takes the same branches.
  const bool nonfinite = nan_if_nonfinite && __syncthreads_or(!all_finite(M, KK, threadIdx.x, blockDim.x));
  const bool stage = K <= kMaxStagedK;
  if (stage || nonfinite) {
    double* copy = stage ? staged : zeros;
    for (int e = threadIdx.x; e < KK; e += blockDim.x) copy[e] = nonfinite ? 0.0 : M[e];
    __syncthreads();
  }
  const double* m = stage ? staged : nonfinite ? zeros : M;
  Status s{};
  if constexpr (is_row_parallel<Problem>) {
    s = solve_by_rows(problem, m, K, w, work, lanes, BlockTeam{slots});
  } else if constexpr (is_team_solver<Problem>) {
    s = problem(m, K, w, work, BlockTeam{slots});
  } else if (threadIdx.x == 0) {
    s = problem(m, K, w, work);
  }
  if (nonfinite) {
    __syncthreads();  // every write of the solve's w is done
    for (int k = threadIdx.x; k < K; k += blockDim.x) w[k] = NAN;
  }
  if (threadIdx.x == 0 && status != nullptr) {
    status[0] = s.iterations;
    status[1] = s.converged;
  }
}

}  // namespace

template <class Problem>
std::string launch(const Problem& problem, const double* M, int K, double* w, double* work, int* status,
                   bool nan_if_nonfinite, int device, uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) {
    return std::string("cudaSetDevice: ") + cudaGetErrorString(cudaGetLastError());
  }
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t shared = K <= kMaxStagedK ? size_t(K) * K * sizeof(double) : 0;
  int lanes = 1;
  if constexpr (is_row_parallel<Problem>) lanes = row_lanes<Problem>(K);
  double* zeros = work + solver_work_size<Problem>(K);
  solve_kernel<Problem><<<1, kThreads, shared, stream>>>(problem, M, K, w, work, zeros, status, nan_if_nonfinite,
                                                         lanes);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("solver kernel launch: ") + cudaGetErrorString(err);
}

#define FLATMTL_INSTANTIATE(P) \
  template std::string launch<P>(const P&, const double*, int, double*, double*, int*, bool, int, uintptr_t);
FLATMTL_INSTANTIATE(Mean)
FLATMTL_INSTANTIATE(Sum)
FLATMTL_INSTANTIATE(Mgda)
FLATMTL_INSTANTIATE(PCGrad)
FLATMTL_INSTANTIATE(GradVac)
FLATMTL_INSTANTIATE(Imtlg)
FLATMTL_INSTANTIATE(AlignedMtl)
FLATMTL_INSTANTIATE(UPGrad)
FLATMTL_INSTANTIATE(DualProj)
FLATMTL_INSTANTIATE(NashMtl)
FLATMTL_INSTANTIATE(FairGrad)
FLATMTL_INSTANTIATE(CAGrad)
FLATMTL_INSTANTIATE(IMGrad)
FLATMTL_INSTANTIATE(AffinityPropagation)
#undef FLATMTL_INSTANTIATE

}  // namespace flatmtl::solvers::cuda
