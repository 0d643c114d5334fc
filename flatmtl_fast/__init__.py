"""flatmtl_fast: fast gradient-based multi-task optimisation over flat gradient buffers.

Public API so far: the streaming primitives :func:`gram` and :func:`combine`, backend selection
(:func:`backends`, :func:`use_backend`), and the reference aggregators in :mod:`flatmtl_fast.reference`.
"""

from .backends import BackendFallbackWarning, backends, current_backend, use_backend
from .primitives import MAX_K, combine, gram

__version__ = "0.1.0"

__all__ = [
    "MAX_K",
    "BackendFallbackWarning",
    "backends",
    "combine",
    "current_backend",
    "gram",
    "use_backend",
]
