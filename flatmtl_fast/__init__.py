"""flatmtl_fast: fast gradient-based multi-task optimisation over flat gradient buffers.

Public API: the aggregators (``flatmtl_fast.UPGrad`` …, fused; their literal references in
:mod:`flatmtl_fast.reference`), the drop-in :func:`backward` over :class:`FlatParameters`, the
streaming primitives :func:`gram` and :func:`combine`, and backend selection (:func:`backends`,
:func:`use_backend`).
"""

from .aggregators import (
    DBMTL,
    IMTLG,
    MGDA,
    RLW,
    AlignedMTL,
    CAGrad,
    DualProj,
    FairGrad,
    GradDrop,
    GradVac,
    IMGrad,
    Mean,
    NashMTL,
    PCGrad,
    Sum,
    UPGrad,
)
from .backends import BackendFallbackWarning, backends, current_backend, use_backend
from .flat import FlatParameters, TaskGradients
from .primitives import MAX_K, combine, ema_row_norms, gram, perturb, row_norms
from .training import FAMO, FMTL, SelectiveGroupUpdate, backward, release_buffers

__version__ = "0.1.0"

__all__ = [
    "DBMTL",
    "FAMO",
    "FMTL",
    "IMTLG",
    "MAX_K",
    "MGDA",
    "RLW",
    "AlignedMTL",
    "BackendFallbackWarning",
    "CAGrad",
    "DualProj",
    "FairGrad",
    "FlatParameters",
    "GradDrop",
    "GradVac",
    "IMGrad",
    "Mean",
    "NashMTL",
    "PCGrad",
    "SelectiveGroupUpdate",
    "Sum",
    "TaskGradients",
    "UPGrad",
    "backends",
    "backward",
    "combine",
    "current_backend",
    "ema_row_norms",
    "gram",
    "perturb",
    "release_buffers",
    "row_norms",
    "use_backend",
]
