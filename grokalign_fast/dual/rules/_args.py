"""Reading and replacing call arguments that may come by position or by keyword."""
from __future__ import annotations

_MISSING = object()


def arg(args, kwargs, i: int, name: str, default=None):
    """The argument at position ``i`` or keyword ``name`` (``default`` if neither)."""
    if i < len(args):
        return args[i]
    if kwargs:
        return kwargs.get(name, default)
    return default


def replace_arg(args, kwargs, i: int, name: str, value):
    """``(args, kwargs)`` with the argument at position ``i`` / keyword ``name`` set to ``value``."""
    if i < len(args):
        args = tuple(args[:i]) + (value,) + tuple(args[i + 1:])
        return args, kwargs
    kwargs = dict(kwargs or {})
    kwargs[name] = value
    return args, kwargs
