"""Layer 3: the K × K solvers of the Gramian methods, on M's device in float64.

Functions from the Gram matrix M (plus losses / K-sized state) to the K weights, written with fixed
iteration budgets and convergence masks: no ``.item()``, ``.cpu()``, ``.tolist()`` or tensor-to-bool, so
an aggregation step never synchronises with the device. Each reproduces the reference solver of the same
method (``flatmtl_fast.reference``); see each function for how exactly.
"""

from .aligned import aligned_weights
from .dual_cone import check_projection_parameters, preference_vector, project_weights
from .fairgrad import fair_weights
from .imtlg import imtlg_weights
from .nash import nash_weights
from .projection import (
    corrected_weights,
    draw_keys,
    gradvac_correction,
    pcgrad_correction,
    visiting_orders,
)
from .simplex import argmin_linear_plus_norm, combination_norm, conflict_averse_weights, min_norm_weights

__all__ = [
    "aligned_weights",
    "argmin_linear_plus_norm",
    "check_projection_parameters",
    "combination_norm",
    "conflict_averse_weights",
    "corrected_weights",
    "draw_keys",
    "fair_weights",
    "gradvac_correction",
    "imtlg_weights",
    "min_norm_weights",
    "nash_weights",
    "pcgrad_correction",
    "preference_vector",
    "project_weights",
    "visiting_orders",
]
