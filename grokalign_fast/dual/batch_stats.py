r"""The per-sample Jacobian of models with batch statistics or dropout, on the reference path.

BatchNorm in train mode normalises every sample with statistics of the whole batch, and dropout
draws a random mask per call. The dual-stream engine defines the Jacobian of such a model as the
*per-sample Jacobian with the batch statistics and the masks held constant* (see
:mod:`grokalign_fast.dual.rules.norm`). The reference estimators use the same definition through
:class:`BatchStatistics`:

1. ``with stats.record(): out = model(x)`` runs the plain forward (the output, the running-stat
   updates and the random numbers are exactly the plain call's) and records, in call order, each
   train-mode ``F.batch_norm``'s batch mean and variance (functions of the parameters, with their
   autograd graph) and each ``F.dropout``'s mask.
2. ``with stats.replay(index): ...`` runs the model again (on ``x[index]``, inside
   ``torch.func.jvp`` or an autograd VJP): each ``F.batch_norm`` normalises with the recorded
   statistics and updates nothing, and each dropout applies the recorded mask of the rows
   ``index``. The replayed model is a pure per-sample function of its input.

Both modes intercept the functional calls, so BatchNorm and dropout modules and the same functions
called from a custom ``forward`` are covered alike.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rules._args import arg

_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_ADD_ = torch.Tensor.add_


def has_batch_dependence(model) -> bool:
    """True when ``model`` holds a BatchNorm that uses batch statistics or an active dropout layer
    (functional calls in a custom ``forward`` are not visible here; :class:`BatchStatistics` handles
    them either way)."""
    if not isinstance(model, nn.Module):
        return False
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            return True
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return True
    return False


class _Record(TorchFunctionMode):
    def __init__(self, owner: "BatchStatistics"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and bool(arg(args, kwargs, 5, "training", False)):
            x = arg(args, kwargs, 0, "input")
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            self.owner.stats.append((mean, var))
            return func(*args, **kwargs)
        if func in _DROPOUTS:
            p, training = float(arg(args, kwargs, 1, "p", 0.5)), bool(arg(args, kwargs, 2, "training", True))
            if training and p > 0:
                x = arg(args, kwargs, 0, "input")
                mask = func(torch.ones_like(x), p, True)
                self.owner.masks.append(mask)
                return x * mask
        return func(*args, **kwargs)


class _Replay(TorchFunctionMode):
    def __init__(self, owner: "BatchStatistics", index: Optional[torch.Tensor], counters):
        super().__init__()
        self.owner, self.index = owner, index
        self.counters = counters  # ids of BatchNorm modules' num_batches_tracked: not advanced in a replay
        self.bn, self.dropout = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ADD_ and args and id(args[0]) in self.counters:
            return args[0]
        if func is F.batch_norm and bool(arg(args, kwargs, 5, "training", False)):
            if not self.owner.stats:
                raise RuntimeError("the model calls batch norm in train mode, but the recorded forward did not")
            # The estimators run the model more than once (a JVP per probe): the i-th call of each
            # pass replays the i-th recorded call.
            mean, var = self.owner.stats[self.bn % len(self.owner.stats)]
            self.bn += 1
            x = arg(args, kwargs, 0, "input")
            weight, bias = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
            eps = float(arg(args, kwargs, 7, "eps", 1e-5))
            shape = (-1,) + (1,) * (x.dim() - 2)
            out = (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
            if weight is not None:
                out = out * weight.view(shape)
            if bias is not None:
                out = out + bias.view(shape)
            return out
        if func in _DROPOUTS:
            p, training = float(arg(args, kwargs, 1, "p", 0.5)), bool(arg(args, kwargs, 2, "training", True))
            if training and p > 0:
                if not self.owner.masks:
                    raise RuntimeError("the model calls dropout in train mode, but the recorded forward did not")
                mask = self.owner.masks[self.dropout % len(self.owner.masks)]
                self.dropout += 1
                if self.index is not None:
                    mask = mask.index_select(0, self.index)
                return arg(args, kwargs, 0, "input") * mask
        return func(*args, **kwargs)


class BatchStatistics:
    """Record a plain forward's batch statistics and dropout masks, then replay them (module doc)."""

    def __init__(self, model):
        self.model = model
        self.stats: List[tuple] = []
        self.masks: List[torch.Tensor] = []

    @contextlib.contextmanager
    def record(self):
        self.stats, self.masks = [], []
        with _Record(self):
            yield self

    @contextlib.contextmanager
    def replay(self, index: Optional[torch.Tensor] = None):
        """Replay the recorded statistics and masks (rows ``index`` of the masks; all when None). The
        replay updates no state: BatchNorm's running statistics and ``num_batches_tracked`` stay as
        the recorded forward left them."""
        counters = set()
        if isinstance(self.model, nn.Module):
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None:
                    counters.add(id(m.num_batches_tracked))
        with _Replay(self, index, counters):
            yield self
