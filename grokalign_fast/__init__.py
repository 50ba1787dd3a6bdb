"""grokalign_fast: fast Jacobian regularisation (GrokAlign) and centroid-alignment monitoring.

Main entry points:
  - :func:`jacobian_norm` -- per-sample ||J(x)||_F (or its square) by the
    "reverse", "forward" or "exact" estimator;
  - :class:`GrokAlign` -- the regulariser as an nn.Module, ``out, penalty = reg(x)``;
  - :func:`centroid`, :func:`centroid_alignment`, ... -- monitoring;
  - :mod:`grokalign_fast.metrics` -- Jacobian row alignment, PC1 / effective
    rank, layer-wise centroids, empirical NTK, Fourier Gini;
  - :mod:`grokalign_fast.optim` -- OrthoGrad.
"""
from . import metrics, ops, optim  # noqa: F401  (ops: registers every extension op's fake)
from ._backends import BackendUnavailableError, available_backends
from .centroids import centroid, centroid_alignment, centroid_inner_product, centroid_norm
from .jacobian import jacobian, jacobian_norm
from .monitor import GrokMonitor
from .probes import draw_probes
from .regularizer import GrokAlign

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "GrokAlign",
    "GrokMonitor",
    "available_backends",
    "centroid",
    "centroid_alignment",
    "centroid_inner_product",
    "centroid_norm",
    "draw_probes",
    "jacobian",
    "jacobian_norm",
    "metrics",
    "optim",
]
