"""Operator families: each holds ``reference.py`` (plain PyTorch, the
specification), the fast backends (``cpp.py``, ``triton.py``) and
``function.py`` (backend choice and the public function).

Importing this package registers the fakes (for FakeTensor and torch.compile) of every extension op,
so they are in place before any trace. The ops' kernels are registered per device (``csrc/cpu``,
``csrc/cuda``) and their autograd in C++ (``csrc/autograd``), so a libtorch user of the CMake package
gets the same gradients.
"""
from . import dual_act, dual_batch_norm_train, dual_layer_norm, dual_max_pool, dual_smooth_act  # noqa: F401
from .mlp import cpp as _mlp_cpp  # noqa: F401
from .mlp import whole_mlp as _whole_mlp  # noqa: F401
from .probe_sqnorm import cpp as _probe_sqnorm_cpp  # noqa: F401
from .attention_jvp import cpp as _attention_jvp_cpp  # noqa: F401
