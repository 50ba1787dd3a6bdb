"""grokalign_fast: fast Jacobian regularisation (GrokAlign) and centroid-alignment monitoring."""
from ._backends import BackendUnavailableError, available_backends
from .jacobian import jacobian, jacobian_norm, sq_norm_estimate
from .probes import draw_probes

__version__ = "0.1.0"
