"""Every Triton kernel of the package compiles for real NVIDIA GPUs (sm_90; sm_80 in part), without a GPU.

Why: without a GPU, CI runs the kernels only in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py), which executes them as NumPy code and accepts programs that the real compiler rejects
(type, layout or lowering errors, ptxas failures). The GPU machine runs Triton 3.6 and CI Triton 3.9, whose
compilers differ; this test is where CI's Triton compiles the kernels for real.

How: Triton's ahead-of-time path, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``,
which needs no driver and runs every stage, TTIR to cubin (the last through ptxas: Triton's own, else the
one on PATH). It runs in a child process without ``TRITON_INTERPRET``: once triton is imported with it set,
``@triton.jit`` gives InterpretedFunctions, Triton's own library functions (``tl.zeros``, ``tl.sum``,
``tl.rand``) included, and the code generator would then call those as interpreter code and fail.

Which specialisations: the ones the package launches. The launch code (``TritonPrimitives`` and
``TritonGradDrop``) runs on meta tensors with stand-in kernels that record each launch instead of running
it, with ``triton_interpreting()`` false so that the GPU block sizes are chosen; the recorded arguments
give the signature (pointer element types, integer widths) and the constexprs (block sizes, flags, dot
precision), as ``JITFunction`` derives them at launch. Two families:

* ``aligned``: every dtype combination and constexpr combination the launch code produces, for K across
  its range, with every pointer and integer argument divisible by 16 (the common, vectorised case);
* ``edge``: float32 launches whose integer arguments are specialised as Triton does at launch: equal to 1
  (compiled in as constants), not divisible by 16 (odd sizes, views at odd offsets), past 2³¹ (64-bit).

All are compiled for sm_90 (H100/H200); for sm_80 (A100), one per kernel and constexpr combination, which
keeps the file's runtime down (Triton takes 0.2 to 2 s per compilation, on one core).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (the Triton kernels are optional)")

from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import KernelInterface  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

import flatmtl_fast  # noqa: E402
from flatmtl_fast.aggregators import graddrop_kernels  # noqa: E402
from flatmtl_fast.backends import TRITON_LAUNCH_OPTIONS  # noqa: E402
from flatmtl_fast.primitives import checks  # noqa: E402
from flatmtl_fast.primitives import triton_kernels as primitives_kernels  # noqa: E402

#: Compute capabilities compiled for: H100/H200 (the GPU machine), then A100 (a subset, see JOBS).
ARCHS = (90, 80)
#: Modules that define Triton kernels; test_kernel_modules_listed checks that no other module does.
KERNEL_MODULES = (primitives_kernels, graddrop_kernels)
#: Programs the launch code targets on an H100 (4 per SM, 132 SMs); it only sizes runtime integers.
H100_PROGRAMS = 4 * 132
#: Task counts at every power-of-two boundary up to the limit: each block size the launch code derives from K.
K_VALUES = sorted(
    {1} | {2**i for i in range(1, checks.MAX_K.bit_length())} | {2**i + 1 for i in range(checks.MAX_K.bit_length() - 1)}
)
#: Columns of the aligned family (a multiple of 16, within int32).
ALIGNED_N = 1 << 20
#: A size past int32 (as in test_int64_indexing).
BEYOND_INT32 = 2**31 + 4099
#: Seconds one compilation may take before the child process is deemed hung.
COMPILE_TIMEOUT = 300
REPLY = "@@compiled "  # prefix of the child's answers


def _module_kernels() -> dict[str, KernelInterface]:
    """Every jit function defined (not imported) in KERNEL_MODULES, by name."""
    return {
        name: value
        for module in KERNEL_MODULES
        for name, value in vars(module).items()
        if isinstance(value, KernelInterface) and getattr(value, "fn", None) is not None
        if value.fn.__module__ == module.__name__
    }


@dataclasses.dataclass
class _Launch:
    kernel: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, name: str, launches: list[_Launch]):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(_Launch(self.name, args, kwargs))


def _meta(*shape: int, dtype: torch.dtype, offset: int = 0, stride: tuple[int, ...] | None = None) -> torch.Tensor:
    """A meta tensor (no memory), optionally at an element offset into its storage or with given strides."""
    stride = stride or torch.empty(shape, device="meta").stride()
    size = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    return torch.empty(size, dtype=dtype, device="meta").as_strided(shape, stride, offset)


def _run_launch_code(G: torch.Tensor, *, out_dtypes, weight_dtypes, flags, perturb_dtypes) -> None:
    """Call every launch method of the package for G (K x N, on the meta device), as the ops call them."""
    K, N = G.shape
    row_stride = G.stride(0) if K > 1 else N
    prims = primitives_kernels.TritonPrimitives()
    for dtype in checks.GRAM_OUT_DTYPES:
        prims.gram(G, row_stride, _meta(K, K, dtype=dtype))  # ops.gram_op
    for weight_dtype in weight_dtypes:  # None: unweighted
        weight = None if weight_dtype is None else _meta(N, dtype=weight_dtype)
        prims.row_norms(G, row_stride, weight, _meta(K, dtype=torch.float64))  # ops.row_norms_op
    # ops.ema_row_norms_op: a float32 buffer of G's shape, float32 gain and (1,) float32 decay (checks.check_ema)
    buffer = _meta(K, N, dtype=torch.float32, offset=G.storage_offset())
    gain = _meta(K, dtype=torch.float32)
    decay = _meta(1, dtype=torch.float32)
    prims.ema_row_norms(buffer, N, G, row_stride, decay, gain, _meta(K, dtype=torch.float64))
    for out_dtype in out_dtypes:
        out = _meta(N, dtype=out_dtype, offset=G.storage_offset())
        for w_dtype in (torch.float32, torch.float64):  # checks.check_weights keeps float64, else float32
            for flag in flags:
                prims.combine(_meta(K, dtype=w_dtype), G, row_stride, out, flag, 0.5)
        # GradDrop: a float64 leak (reference _leak_column) and an int64 seed (torch.randint)
        leak, seed = _meta(K, dtype=torch.float64), _meta(1, dtype=torch.int64)
        graddrop_kernels.TritonGradDrop().run(G, leak, seed, out)
    for base_dtype, direction_dtype, scale_dtype in perturb_dtypes:  # out has base's dtype (checks.check_perturb)
        base = _meta(N, dtype=base_dtype, offset=G.storage_offset())
        direction = _meta(N, dtype=direction_dtype)
        for flag in flags:
            prims.perturb(base, direction, _meta(1, dtype=scale_dtype), base, flag)


def _record_launches(family: str) -> list[_Launch]:
    launches: list[_Launch] = []
    with contextlib.ExitStack() as stack:
        for module in KERNEL_MODULES:
            stack.enter_context(mock.patch.object(module, "triton_interpreting", lambda: False))
            for name, value in vars(module).items():
                if isinstance(value, KernelInterface):
                    stack.enter_context(mock.patch.object(module, name, _Recorder(name, launches)))
        stack.enter_context(mock.patch.object(primitives_kernels, "_target_programs", lambda device: H100_PROGRAMS))
        if family == "aligned":
            dtypes = checks.KERNEL_DTYPES
            for dtype in dtypes:
                for K in K_VALUES:
                    _run_launch_code(
                        _meta(K, ALIGNED_N, dtype=dtype),
                        out_dtypes=dtypes,
                        weight_dtypes=(None, *dtypes),
                        flags=(False, True),
                        perturb_dtypes=[(dtype, d, s) for d in dtypes for s in checks.SCALE_DTYPES],
                    )
        else:
            f32 = torch.float32
            for K, N, row_stride, offset in (
                (1, 1, 1, 0),  # sizes equal to 1
                (3, 1001, 1003, 1),  # odd sizes, views at odd offsets
                (2, BEYOND_INT32, BEYOND_INT32, 0),  # N past int32
                (2, 1000, BEYOND_INT32, 0),  # row offsets past int32
            ):
                _run_launch_code(
                    _meta(K, N, dtype=f32, offset=offset, stride=(row_stride, 1)),
                    out_dtypes=(f32,),
                    weight_dtypes=(None, f32),
                    flags=(False,),
                    perturb_dtypes=[(f32, f32, f32)],
                )
    return launches


@dataclasses.dataclass(frozen=True)
class _Spec:
    module: str
    kernel: str
    family: str
    signature: tuple[tuple[str, str], ...]  # (argument, type), "constexpr" for constexprs
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]  # arguments with Triton's divisible-by-16 attribute

    def label(self) -> str:
        """Kernel, family, pointer element types and constexprs (edge: every argument's type, "/16" when
        divisible by 16), e.g. ``_combine_kernel-aligned-W=fp32,G=bf16,Out=fp16,ACCUMULATE=True,...``."""
        consts = dict(self.constexprs)
        parts = []
        for name, ty in self.signature:
            if name in consts:
                parts.append(f"{name}={consts[name]}")
            elif self.family == "edge":
                parts.append(f"{name}:{ty}" + ("/16" if name in self.divisible else ""))
            elif ty.startswith("*"):
                parts.append(f"{name}={ty[1:]}")
        return f"{self.kernel}-{self.family}-" + ",".join(parts)


@functools.cache
def _parameters(kernel: str) -> tuple[list[str], set[str]]:
    """The kernel's argument names and its constexpr arguments, as Triton reads them."""
    fn = KERNELS[kernel]
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # parses, compiles nothing
    return jit.arg_names, {jit.arg_names[i] for i in jit.constexprs}


def _spec(launch: _Launch, family: str) -> _Spec:
    """The specialisation JITFunction compiles for this launch (``family`` "aligned": all pointers and
    integers taken as divisible by 16, integers equal to 1 not compiled in as constants)."""
    kernel = KERNELS[launch.kernel]
    arg_names, const_names = _parameters(launch.kernel)
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in TRITON_LAUNCH_OPTIONS}  # compile options
    bound = inspect.signature(kernel.fn).bind(*launch.args, **kwargs)
    signature, constexprs, divisible = [], [], []
    for name in arg_names:
        value = bound.arguments[name]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in const_names or (family == "edge" and is_int and value == 1):
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        signature.append((name, mangle_type(value)))
        if family == "aligned" and (is_int or isinstance(value, torch.Tensor)):
            divisible.append(name)
        elif (is_int and value % 16 == 0) or (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0):
            divisible.append(name)  # meta tensors: data_ptr() is the byte offset into their storage
    module = kernel.fn.__module__
    return _Spec(module, launch.kernel, family, tuple(signature), tuple(constexprs), tuple(divisible))


KERNELS = _module_kernels()
LAUNCHES = {family: _record_launches(family) for family in ("aligned", "edge")}
SPECS = list(dict.fromkeys(_spec(launch, family) for family, ls in LAUNCHES.items() for launch in ls))


def _one_per_constexprs(specs: list[_Spec]) -> list[_Spec]:
    """The first aligned spec of each kernel and constexpr combination."""
    first: dict[tuple, _Spec] = {}
    for spec in specs:
        if spec.family == "aligned":
            first.setdefault((spec.kernel, spec.constexprs), spec)
    return list(first.values())


#: (spec, arch) pairs compiled: every spec for sm_90 (the GPU machine); for sm_80, one per constexpr combination.
JOBS = [(spec, ARCHS[0]) for spec in SPECS] + [
    (spec, arch) for arch in ARCHS[1:] for spec in _one_per_constexprs(SPECS)
]


def _compile(module: str, kernel: str, signature: dict, constexprs: dict, divisible: list, arch: int):
    """triton.compile for one specialisation (in a child process, where kernels are real JITFunctions)."""
    fn = getattr(importlib.import_module(module), kernel)
    assert isinstance(fn, JITFunction), f"{kernel} is a {type(fn).__name__} (TRITON_INTERPRET set?)"
    attrs = {(fn.arg_names.index(name),): BaseBackend.parse_attr("D") for name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=TRITON_LAUNCH_OPTIONS)


def _serve() -> None:
    """A child process: compile each request (a JSON line on stdin), answer each with one JSON line."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else printed goes to the log
    for line in sys.stdin:
        request = json.loads(line)
        try:
            compiled = _compile(**request)
            ptx_target = f".target sm_{request['arch']}" in compiled.asm["ptx"]
            reply = {"stages": list(compiled.asm), "ptx_target": ptx_target}
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(REPLY + json.dumps(reply) + "\n")
        replies.flush()


class _Worker:
    """A child process that compiles, one request at a time, its stderr kept in a log file."""

    def __init__(self, env: dict[str, str]):
        self.log = tempfile.TemporaryFile()
        command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )

    def compile(self, spec: _Spec, arch: int) -> dict:
        request = {
            "module": spec.module,
            "kernel": spec.kernel,
            "signature": dict(spec.signature),
            "constexprs": dict(spec.constexprs),
            "divisible": list(spec.divisible),
            "arch": arch,
        }
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], COMPILE_TIMEOUT)
            line = self.process.stdout.readline() if ready else ""
        except OSError:  # the process has exited
            ready, line = True, ""
        if line.startswith(REPLY):
            return json.loads(line[len(REPLY) :])
        if ready:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            status = f"exited with code {self.process.returncode}"
        else:
            self.process.kill()
            status = f"timed out after {COMPILE_TIMEOUT} s"
        self.log.seek(0)
        log = self.log.read().decode(errors="replace")[-4000:]
        return {"error": f"the compiling process {status}; the end of its log:\n{log}", "dead": True}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()


class _Compiler:
    """Compiles the jobs selected for this session ahead of the tests, in a few child processes."""

    def __init__(self, jobs: list[tuple[_Spec, int]], env: dict[str, str]):
        self.env = env
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, min(4, cpus, len(jobs)))
        self.idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self.workers = [_Worker(env) for _ in range(workers)]
        for worker in self.workers:
            self.idle.put(worker)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.results = {job: self.pool.submit(self._run, *job) for job in jobs}

    def _run(self, spec: _Spec, arch: int) -> dict:
        worker = self.idle.get()
        try:
            reply = worker.compile(spec, arch)
            if reply.get("dead"):  # a crash or hang: later jobs get a fresh process
                worker.close()
                self.workers.remove(worker)
                worker = _Worker(self.env)
                self.workers.append(worker)
            return reply
        finally:
            self.idle.put(worker)

    def result(self, spec: _Spec, arch: int) -> dict:
        job = (spec, arch)
        if job not in self.results:
            self.results[job] = self.pool.submit(self._run, spec, arch)
        return self.results[job].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers:
            worker.close()


def _ptxas_env() -> dict[str, str]:
    """Triton's own ptxas when it has one for each arch, else the one on PATH (skips when there is none)."""
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no NVIDIA backend")
    get_ptxas = nvidia.get_ptxas
    try:
        for arch in ARCHS:
            get_ptxas(arch)
        return {}
    except RuntimeError:
        system = shutil.which("ptxas")
        if system is None:
            pytest.skip("no ptxas: Triton bundles none here and none is on PATH (set TRITON_PTXAS_PATH)")
        return {"TRITON_PTXAS_PATH": system, "TRITON_PTXAS_BLACKWELL_PATH": system}


@pytest.fixture(scope="module")
def compiler(request):
    """Starts compiling every job of this module's selected tests, in collection order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | _ptxas_env()
    package_root = str(Path(flatmtl_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    selected = [
        item.callspec.params["job"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    ]
    compiler = _Compiler(selected, env)
    try:
        yield compiler
    finally:
        compiler.close()


@pytest.mark.parametrize("job", JOBS, ids=[f"{spec.label()}-sm{arch}" for spec, arch in JOBS])
def test_compiles_to_cubin(job, compiler):
    spec, arch = job
    reply = compiler.result(spec, arch)
    if "error" in reply:
        pytest.fail(f"{spec.label()} does not compile for sm_{arch} (Triton {triton.__version__}):\n{reply['error']}")
    assert "cubin" in reply["stages"], reply
    assert reply["ptx_target"], reply


def test_every_kernel_is_launched():
    """Every jit function is launched by the launch code run above, or called by a launched kernel."""
    launched = {launch.kernel for launch in LAUNCHES["aligned"]}
    sources = [inspect.getsource(KERNELS[name].fn) for name in launched]
    missed = [name for name in KERNELS if name not in launched and not any(f"{name}(" in s for s in sources)]
    assert not missed, f"jit functions that no recorded launch covers: {missed}"
    assert launched == {launch.kernel for launch in LAUNCHES["edge"]}


def test_kernel_modules_listed():
    """No module other than KERNEL_MODULES defines a Triton kernel."""
    root = Path(flatmtl_fast.__file__).parent
    listed = {Path(module.__file__).resolve() for module in KERNEL_MODULES}
    defining = {path.resolve() for path in root.rglob("*.py") if "triton.jit" in path.read_text(encoding="utf-8")}
    assert defining <= listed, f"modules with Triton kernels missing from KERNEL_MODULES: {defining - listed}"


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
