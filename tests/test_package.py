"""Package-level behaviour: the native build, backend discovery and selection, the fallback path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import flatmtl_fast
from flatmtl_fast import _native


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(os.environ.get("FLATMTL_NATIVE") == "0", reason="native build disabled by FLATMTL_NATIVE=0")
def test_native_module_is_built():
    """The install must have produced _C (a failed native build only warns at install time)."""
    assert _native.module() is not None, _native.load_error()
    assert flatmtl_fast.backends()["cpp"] == "available"


@pytest.mark.skipif(
    os.environ.get("FLATMTL_CUDA") == "0" or shutil.which("nvcc") is None, reason="no nvcc: CUDA not compiled"
)
def test_cuda_kernels_are_compiled_when_nvcc_is_present():
    """CI compile-checks the CUDA sources: with nvcc on PATH they must be linked into _C."""
    assert _native.module().with_cuda


def test_backends_reports_every_name():
    report = flatmtl_fast.backends()
    assert set(report) == {"reference", "triton", "cpp", "cuda"}
    assert report["reference"] == "available"
    if not torch.cuda.is_available():
        assert report["cuda"] != "available" and "no CUDA device" in report["cuda"]


def test_cpu_kernels_never_pick_an_unsupported_isa():
    module = _native.module()
    supported = module.cpu_supported_isas().split(",")
    assert supported[0] == "portable" and module.cpu_isa() in supported
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        module.cpu_set_isa("sse9")


def test_use_backend_nests_and_restores():
    assert flatmtl_fast.current_backend() == os.environ.get("FLATMTL_BACKEND", "auto")
    with flatmtl_fast.use_backend("reference"):
        with flatmtl_fast.use_backend("cpp"):
            assert flatmtl_fast.current_backend() == "cpp"
        assert flatmtl_fast.current_backend() == "reference"


def test_environment_variable_sets_the_default():
    result = _run(
        """
        import flatmtl_fast
        print(flatmtl_fast.current_backend())
        """,
        FLATMTL_BACKEND="reference",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    bad = _run("import flatmtl_fast, torch; flatmtl_fast.gram(torch.ones(2, 3))", FLATMTL_BACKEND="fastest")
    assert bad.returncode != 0 and "FLATMTL_BACKEND must be one of" in bad.stderr


def test_import_without_native_module_falls_back_and_says_so_once():
    result = _run(
        """
        import sys, warnings
        sys.modules["flatmtl_fast._C"] = None  # as if the native build had been skipped
        import torch, flatmtl_fast
        report = flatmtl_fast.backends()
        assert "not built" in report["cpp"], report
        G = torch.randn(3, 50)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            M = flatmtl_fast.gram(G)
            flatmtl_fast.gram(G)
            flatmtl_fast.combine(torch.ones(3), G)
        notices = [w for w in caught if issubclass(w.category, flatmtl_fast.BackendFallbackWarning)]
        assert len(notices) == 1, [str(w.message) for w in caught]
        assert torch.allclose(M, G @ G.T, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_ci_runs_the_readme_test_command():
    """.ci/run must call exactly the test command the README gives."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python -m pip install torch"))
    assert command in readme


def test_code_is_ruff_clean():
    from pathlib import Path

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", str(root)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
