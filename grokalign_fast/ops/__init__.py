"""Operator families: each holds ``reference.py`` (plain PyTorch, the
specification), the fast backends (``cpp.py``, ``triton.py``) and
``function.py`` (backend choice and the public function).

Importing this package registers the fakes (for FakeTensor and torch.compile) and the autograd
formulas of every extension op that Python wires, so they are in place before any trace.
"""
from . import dual_act  # noqa: F401
from .mlp import cpp as _mlp_cpp  # noqa: F401
from .probe_sqnorm import cpp as _probe_sqnorm_cpp  # noqa: F401
from .attention_jvp import cpp as _attention_jvp_cpp  # noqa: F401
