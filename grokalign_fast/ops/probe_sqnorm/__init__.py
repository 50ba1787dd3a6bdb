from .function import probe_sqnorm

__all__ = ["probe_sqnorm"]
