"""Builds tests/solvers/team_race_check.cpp with ThreadSanitizer and runs it: every team and row-parallel solver
on teams of CPU threads, the split the CUDA kernels make over their block. A missing barrier is a data race
that ThreadSanitizer reports (and that the bit-identity tests on CPU threads may miss by timing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no g++ to build the race check")
def test_team_solves_have_no_data_races_and_give_the_single_worker_bits(tmp_path):
    executable = tmp_path / "team_race_check"
    build = subprocess.run(
        [
            CXX,
            "-std=c++17",
            "-O1",
            "-g",
            "-fsanitize=thread",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(ROOT / "tests" / "solvers" / "team_race_check.cpp"),
            "-o",
            str(executable),
            "-lpthread",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        [str(executable)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"},
    )
    # Exit 66: ThreadSanitizer found a race; 1: a team's result differed from the single worker's.
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    assert "0 mismatches" in run.stdout
