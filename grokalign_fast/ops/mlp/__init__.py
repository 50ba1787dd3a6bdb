from .function import dual_linear, dual_linear_sqnorm
from .reference import ACTIVATIONS

__all__ = ["dual_linear", "dual_linear_sqnorm", "ACTIVATIONS"]
