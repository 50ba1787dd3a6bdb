r"""Models of token inputs: the Jacobian with respect to the embedding output.

A model that takes integer tokens ``x [B, ...]`` has no Jacobian with respect to ``x``; as for
transformers (PAPER.md, the modular-addition experiment), the penalty takes the Jacobian with
respect to the output ``e = E[x]`` of the first embedding lookup of ``x`` (``F.embedding`` or an
``nn.Embedding`` called on the input itself; later lookups, such as positional embeddings of
``arange(T)``, are parts of the model). So ``J = d f / d e`` at ``e = E[x]``, with the embedding
table's gradient flowing through the primal ``e`` only.

- :func:`output_shape` finds that lookup's per-sample output shape (the probes' shape) from one
  sample, leaving no trace.
- :class:`Substitute` runs the model with that lookup's output replaced by a given tensor: the
  reference estimators differentiate ``e -> model(x)`` through it.
- The dual-stream engine seeds its tangent streams at that lookup
  (:class:`~grokalign_fast.dual.engine.DualMode`).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rules._args import arg


def is_token_input(x) -> bool:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex())


class _Find(TorchFunctionMode):
    def __init__(self, x):
        super().__init__()
        self.x, self.shape = x, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding and self.shape is None and arg(args, kwargs, 0, "input") is self.x:
            self.shape = tuple(out.shape[1:])
        return out


@contextlib.contextmanager
def no_trace(model):
    """Run ``model`` without gradients, restoring the random numbers, the buffers and the modes."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if isinstance(model, nn.Module):
                model.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def output_shape(model, x: torch.Tensor) -> Tuple[int, ...]:
    """The per-sample shape of the first embedding lookup of the tokens ``x`` in ``model``."""
    first = x[:1]
    finder = _Find(first)
    with expect_embedding(x, lambda: finder.shape is not None), no_trace(model), finder:
        model(first)
    return finder.shape


@contextlib.contextmanager
def expect_embedding(x: torch.Tensor, found):
    """Run a model on the tokens ``x``: if no embedding lookup of them was seen (``found()`` is
    false), whatever the model raised on integer inputs becomes :func:`not_embedded`'s error."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (a model that cannot take tokens fails in its own way)
        if not found():
            raise not_embedded(x) from exc
        raise
    if not found():
        raise not_embedded(x)


def not_embedded(x: torch.Tensor) -> TypeError:
    return TypeError(
        f"x has integer dtype {x.dtype} but the model embeds none of it with F.embedding / nn.Embedding: the "
        "Jacobian is taken with respect to the first embedding of integer inputs, or with respect to "
        "floating-point inputs")


class Substitute(TorchFunctionMode):
    """While active, the first ``F.embedding`` of ``tokens`` returns ``value`` instead; with
    ``capture=True`` it returns the lookup and keeps it in ``self.value``."""

    def __init__(self, tokens: torch.Tensor, value: Optional[torch.Tensor] = None, capture: bool = False):
        super().__init__()
        self.tokens, self.value, self.capture, self.used = tokens, value, capture, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and not self.used and arg(args, kwargs, 0, "input") is self.tokens:
            self.used = True
            if self.capture:
                self.value = func(*args, **kwargs)
            return self.value
        return func(*args, **kwargs)


def as_function_of_embedding(model, tokens: torch.Tensor):
    """``f(e) = model(tokens)`` with the first embedding lookup of ``tokens`` replaced by ``e``."""

    def f(e):
        with Substitute(tokens, e):
            return model(tokens)

    return f
