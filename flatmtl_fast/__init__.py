"""flatmtl_fast: fast gradient-based multi-task optimisation over flat gradient buffers.

Public API: the aggregators (``flatmtl_fast.UPGrad`` …, fused; their literal references in
:mod:`flatmtl_fast.reference`), the drop-in :func:`backward` over :class:`FlatParameters`, the
streaming primitives :func:`gram` and :func:`combine`, and backend selection (:func:`backends`,
:func:`use_backend`).
"""

from . import reference
from .backends import BackendFallbackWarning, backends, current_backend, use_backend
from .flat import FlatParameters, TaskGradients
from .primitives import MAX_K, combine, gram
from .training import backward, release_buffers

__version__ = "0.1.0"

__all__ = [
    "MAX_K",
    "BackendFallbackWarning",
    "FlatParameters",
    "TaskGradients",
    "backends",
    "backward",
    "combine",
    "current_backend",
    "gram",
    "reference",
    "release_buffers",
    "use_backend",
]
