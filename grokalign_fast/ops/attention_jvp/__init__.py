r"""``attention_jvp``: scaled dot-product attention and its JVP along P tangents, differentiable in
all six inputs (the math: :mod:`.reference`)."""
from .reference import attention_jvp as reference  # noqa: F401
