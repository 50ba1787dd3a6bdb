"""Operator families: each holds ``reference.py`` (plain PyTorch, the
specification), the fast backends (``cpp.py``, ``triton.py``) and
``function.py`` (backend choice and the public function)."""
