"""The reference backend: every method, literally, in plain PyTorch — the oracle for fused work.

One file per method, readable as a specification. Speed is a non-goal here: the fused
aggregators in :mod:`flatmtl_fast` are proven equal to these classes.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public class name -> module (file) that defines it.
_CLASS_MODULES = {
    "Mean": "mean_sum",
    "Sum": "mean_sum",
    "MGDA": "mgda",
    "PCGrad": "pcgrad",
    "CAGrad": "cagrad",
    "IMTLG": "imtlg",
    "NashMTL": "nash_mtl",
    "AlignedMTL": "aligned_mtl",
    "FairGrad": "fairgrad",
    "UPGrad": "upgrad",
    "DualProj": "dualproj",
    "GradVac": "gradvac",
    "GradDrop": "graddrop",
    "RLW": "rlw",
    "DBMTL": "dbmtl",
    "IMGrad": "imgrad",
}

__all__ = sorted(_CLASS_MODULES)


def __getattr__(name: str) -> Any:
    # Lazy so that importing flatmtl_fast stays cheap and one method's module never blocks another.
    if name in _CLASS_MODULES:
        module = importlib.import_module(f".{_CLASS_MODULES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
