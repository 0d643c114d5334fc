"""Layer 4: aggregators (one class per method) and the API they share.

The fused aggregators run one ``gram`` pass over G, a K × K solve on the device and one ``combine`` pass
(GradDrop and DB-MTL: their own streaming passes), without host synchronisation; each reproduces the
reference class of the same name (:mod:`flatmtl_fast.reference`).
"""

from .aligned_mtl import AlignedMTL
from .base import Aggregator, GramianAggregator
from .cagrad import CAGrad, IMGrad
from .dbmtl import DBMTL
from .dual_cone import DualProj, UPGrad
from .fairgrad import FairGrad
from .graddrop import GradDrop
from .gradvac import GradVac
from .imtlg import IMTLG
from .mean_sum import Mean, Sum
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .rlw import RLW

__all__ = [
    "DBMTL",
    "IMTLG",
    "MGDA",
    "RLW",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GramianAggregator",
    "IMGrad",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Sum",
    "UPGrad",
]
