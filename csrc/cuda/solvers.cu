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

// The block runs solve_as_kernel (solvers.h) with M staged in shared memory when K ≤ kMaxStagedK; zeros (K x K
// doubles past the solver's scratch in work) stand in for an unstaged non-finite M.
template <class Problem>
__global__ void __launch_bounds__(kThreads)
    solve_kernel(Problem problem, const double* __restrict__ M, int K, double* w, double* work, double* zeros,
                 int* status, bool nan_if_nonfinite, int lanes) {
  extern __shared__ double staged[];
  __shared__ double slots[2 * kThreads];
  const Status s = solve_as_kernel(problem, M, K, w, work, K <= kMaxStagedK ? staged : nullptr, zeros,
                                   nan_if_nonfinite, lanes, BlockTeam{slots});
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
