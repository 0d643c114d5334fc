"""The compiled K × K solvers (header-only C++ in csrc/include/flatmtl/solvers): the very same code runs
on the CPU (``cpp`` backend) and as single-block CUDA kernels (``cuda`` backend).

Each aggregator that has a native solver describes the call with ``_native_solver`` (the solver's name
and its parameters); :func:`solve_natively` picks the backend and runs it, or returns None so the
aggregator falls back to its on-device torch solver (the ``reference`` implementation of the solve).
Solvers used outside the aggregators (affinity propagation) are called by name through
:func:`run_native_solver`, with the same choice of backend.

The CUDA kernels are compiled and bound but have not yet been validated on a GPU, so ``auto`` does not
pick them: they run only under an explicit ``use_backend("cuda")``; ``auto`` on CUDA tensors uses the
torch solvers (no host sync either way, except IMTL-G's ``torch.linalg.svd`` and Aligned-MTL's
``torch.linalg.eigh``, which check LAPACK's status on the host). Under ``torch.compile`` the torch solvers are
traced (the native ones take raw addresses, which traced tensors do not have).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _native
from ..backends import current_backend, resolve

Parameter = Tensor | float | int | bool | None

#: A row-parallel solver (UPGrad, PCGrad, GradVac: K independent per-task problems) spreads its tasks over CPU
#: threads, each taking at least this many. Starting a thread and its barriers cost ~0.1 ms, and on a shared machine
#: a thread that another process preempts stalls the solve for a time slice (ms): 2 cores, one kept busy by another
#: process, K = 64: UPGrad on 2 threads 1.03 ms median (p90 4.0 ms), on one 0.54 ms (quiet: 0.45 against 0.53 ms).
#: So a solve under ~1 ms stays on one thread; from K = 96 on, the split repays (quiet, UPGrad K = 96: 1.96 -> 0.99 ms).
TASKS_PER_SOLVE_THREAD = 48
#: The bindings' limit (the threads of one CUDA block, whose splits the CPU threads reproduce).
MAX_SOLVE_THREADS = 128


class _NativeSolvers:
    def __init__(self, name: str) -> None:
        self.name = name

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        module = _native.module()
        if module is None or not hasattr(module, "solve_mgda"):
            return "the native module has no solvers"
        wanted = "cpu" if self.name == "cpp" else "cuda"
        if device.type != wanted:
            return f"the {self.name} solvers run on {wanted} tensors, got {device}"
        return None

    def solve(
        self, solver: str, M: Tensor, parameters: Sequence[Parameter], *, nan_if_nonfinite: bool = False
    ) -> tuple[Tensor, bool | None]:
        """The K doubles ``solver`` writes for M, and whether it converged (None on CUDA: the status stays on the
        device). ``nan_if_nonfinite``: an M with a NaN or Inf is solved as M = 0 (so the solve cannot fail, and
        state it keeps moves as for M = 0) and gives NaN weights, in the same call (the aggregators' policy, see
        ``FusedGramian``)."""
        module = _native.module()
        K = M.shape[0]
        M = M.contiguous()
        w = torch.empty(K, dtype=torch.float64, device=M.device)
        # Tensors become addresses; the list keeps them alive for the call. None is a null pointer.
        args = [0 if p is None else p.data_ptr() if isinstance(p, Tensor) else p for p in parameters]
        if self.name == "cpp":
            threads = _cpu_threads(module, solver, K)
            if threads > 1:  # the tasks spread over the threads, each with its scratch; same bits as one thread
                work = _scratch(getattr(module, f"solve_{solver}_threaded_work_size")(K, threads), M.device)
                _, converged = getattr(module, f"solve_{solver}_threaded")(
                    M.data_ptr(), K, *args, w.data_ptr(), work.data_ptr(), threads, threads, nan_if_nonfinite
                )
            else:
                work = _scratch(getattr(module, f"solve_{solver}_work_size")(K), M.device)
                _, converged = getattr(module, f"solve_{solver}")(
                    M.data_ptr(), K, *args, w.data_ptr(), work.data_ptr(), nan_if_nonfinite
                )
            return w, converged
        else:
            # The CUDA kernels may spread a solve over the threads of their block, with scratch for each.
            work = _scratch(getattr(module, f"cuda_solve_{solver}_work_size")(K), M.device)
            device = M.device.index if M.device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(M.device).cuda_stream
            getattr(module, f"cuda_solve_{solver}")(
                M.data_ptr(), K, *args, w.data_ptr(), work.data_ptr(), 0, device, stream, nan_if_nonfinite
            )
            return w, None


def _scratch(doubles: int, device: torch.device) -> Tensor:
    return torch.empty(max(1, doubles), dtype=torch.float64, device=device)


def _cpu_threads(module: object, solver: str, K: int) -> int:
    """CPU threads for a native solve: for a row-parallel solver, torch's intra-op threads, at most one per
    ``TASKS_PER_SOLVE_THREAD`` tasks; else 1 (a team solver's barriers cost more on CPU threads than its splits
    save). Any number gives the single thread's result bit for bit (tests/solvers)."""
    if not getattr(module, f"solve_{solver}_row_parallel", False):
        return 1
    return max(1, min(torch.get_num_threads(), K // TASKS_PER_SOLVE_THREAD, MAX_SOLVE_THREADS))


class _TorchSolvers:
    """Marker for the on-device torch solvers (each aggregator's own ``_solve``)."""

    name = "reference"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        return None


_CPU, _CUDA, _TORCH = _NativeSolvers("cpp"), _NativeSolvers("cuda"), _TorchSolvers()


def _native_backend(M: Tensor) -> _NativeSolvers | None:
    """The native solvers that run on M under the current backend, or None when the torch solver should run."""
    # While torch.compile traces, tensors have no real addresses: the torch solver is traced instead.
    if torch.compiler.is_compiling():
        return None
    # Triton covers the streaming passes only: its solves are the on-device torch ones.
    impls = {"cpp": _CPU, "reference": _TORCH, "triton": _TORCH}
    if current_backend() == "cuda":
        impls["cuda"] = _CUDA
    impl = resolve("solve", impls, M.device, M.dtype)
    return None if impl is _TORCH else impl


def solve_natively(aggregator: object, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor | None:
    """The aggregator's weights from its native solver, with the aggregators' non-finite policy applied (NaN
    weights from a solve on M = 0 where M holds a NaN or Inf), or None when the torch solver should run."""
    describe = getattr(aggregator, "_native_solver", None)
    impl = None if describe is None else _native_backend(M)
    # Beyond the compiled solvers' size limit the torch solver runs, rather than an error naming neither.
    if impl is None or M.shape[0] > getattr(_native.module(), "solver_max_k", 0):
        return None
    call = describe(M, losses, input_dtype)
    if call is None:
        return None
    solver, parameters = call
    w, converged = impl.solve(solver, M, parameters, nan_if_nonfinite=True)
    # Aggregators whose native solve only fails to converge on numerical trouble (CAGrad's and IMGrad's simplex
    # problems, e.g. a task gradient 1e-12 of the others) hand it to their torch solver, where the status is known.
    if converged is False and getattr(aggregator, "_torch_solver_if_unconverged", False):
        return None
    return w


def run_native_solver(solver: str, M: Tensor, parameters: Sequence[Parameter]) -> Tensor | None:
    """The K doubles native solver ``solver`` writes for the float64 K × K M (a solver outside the
    aggregators, e.g. affinity propagation), chosen as the aggregators' solvers are; None when the caller's
    torch version should run."""
    impl = _native_backend(M)
    module = _native.module()
    # A module built before ``solver`` was added lacks it: the torch version runs until it is rebuilt. Beyond
    # the native size limit the torch version runs too, rather than raising.
    if impl is None or not hasattr(module, f"solve_{solver}") or M.shape[0] > getattr(module, "solver_max_k", 0):
        return None
    return impl.solve(solver, M, parameters)[0]
