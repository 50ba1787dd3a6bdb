"""The dual-stream engine: the model's output and K forward-mode tangent streams in one pass.

:func:`~grokalign_fast.dual.engine.run` runs any ``nn.Module`` (or callable) on the primal batch
and the tangent probes stacked along the batch, applying one rule per function the model calls
(:mod:`.rules`), and returns the output and the per-sample Hutchinson estimate of ``||J||_F^2``.
:mod:`.plan` chooses, per model and input signature, between the engine, the fused whole-MLP ops
and the reference estimators, and explains why a faster path cannot serve.
"""
from .engine import DualMode, NoRuleError, run
from .streams import SampleMixingError, Streams

__all__ = ["DualMode", "NoRuleError", "SampleMixingError", "Streams", "run"]
