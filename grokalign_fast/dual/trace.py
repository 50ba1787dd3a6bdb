r"""Finding the MLP chain in a model, however its ``forward`` is written.

The fused whole-MLP ops (``grokalign::dual_mlp_sqnorm``, ``grokalign::reverse_mlp``) serve a chain
``Linear -> activation -> ... -> Linear``. An ``nn.Sequential`` states its chain directly; a model
with a ``forward`` of its own (a ``ModuleList`` of Linear layers and a loop, functional activations)
is traced once with ``torch.fx`` (torch.nn layers as leaves), and a graph that is a single chain of
Linear layers, activations, ``Flatten``, ``Dropout`` and ``Identity`` gives the same chain. So both
ways of writing the paper's MLP take the same fused path.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.mlp import model as mlp_model

# Functional activations and the module each one stands for in the chain.
_FUNCTIONAL_ACTS = {
    F.relu: lambda a, k: nn.ReLU(),
    torch.relu: lambda a, k: nn.ReLU(),
    "relu": lambda a, k: nn.ReLU(),
    torch.tanh: lambda a, k: nn.Tanh(),
    "tanh": lambda a, k: nn.Tanh(),
    torch.sigmoid: lambda a, k: nn.Sigmoid(),
    "sigmoid": lambda a, k: nn.Sigmoid(),
    F.silu: lambda a, k: nn.SiLU(),
    F.gelu: lambda a, k: nn.GELU(approximate=k.get("approximate", a[1] if len(a) > 1 else "none")),
    F.leaky_relu: lambda a, k: nn.LeakyReLU(k.get("negative_slope", a[1] if len(a) > 1 else 0.01)),
}


def _functional_act(node) -> Optional[nn.Module]:
    key = node.target
    try:
        make = _FUNCTIONAL_ACTS.get(key)
    except TypeError:
        return None
    if make is None:
        return None
    if node.op == "call_method" and not isinstance(key, str):
        return None
    return make(tuple(node.args), dict(node.kwargs))


def traced_chain(model: nn.Module) -> Tuple[Optional[List[nn.Module]], Optional[str]]:
    """``(modules, None)`` when ``model``'s traced graph is one chain of calls, each on the previous
    value, else ``(None, reason)``."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001  (any tracing failure: data-dependent control flow, ...)
        return None, f"torch.fx cannot trace {type(model).__name__}.forward ({type(exc).__name__})"
    modules: List[nn.Module] = []
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None, f"{type(model).__name__}.forward takes more than one input"
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                return None, f"{type(model).__name__}.forward does not return the end of one chain of layers"
            return modules, None
        if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not prev:
            return None, f"{type(model).__name__}.forward is not one chain of layers (node {node.name})"
        if node.op == "call_module":
            modules.append(model.get_submodule(node.target))
        elif node.op in ("call_function", "call_method"):
            act = _functional_act(node)
            if act is None:
                if node.target in (operator.getitem,) or node.op == "get_attr":
                    return None, f"{type(model).__name__}.forward indexes a value (node {node.name})"
                return None, f"{type(model).__name__}.forward calls {node.target} (node {node.name})"
            modules.append(act)
        else:
            return None, f"{type(model).__name__}.forward reads an attribute (node {node.name})"
        prev = node
    return None, f"{type(model).__name__}.forward has no output"


def mlp_chain(model) -> Tuple[Optional[List[mlp_model.Step]], Optional[str]]:
    """The fused MLP path's layer plan for ``model`` (an ``nn.Sequential`` or any module whose traced
    graph is a chain of MLP layers), or ``(None, reason)``."""
    if not isinstance(model, nn.Module):
        return None, f"the fused MLP ops run nn.Module models, got {type(model).__name__}"
    if isinstance(model, nn.Sequential):
        return mlp_model.plan(model)
    modules, reason = traced_chain(model)
    if modules is None:
        return None, reason
    return mlp_model.plan(nn.Sequential(*modules))
