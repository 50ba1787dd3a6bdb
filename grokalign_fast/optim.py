r"""Optimiser wrappers.

:class:`OrthoGrad` (⊥Grad, Prieto et al. 2025, "Grokking at the edge of numerical stability"):
before each step of a base optimiser, every parameter's gradient loses its component along the
parameter itself,

    g  <-  g - (<g, w> / ||w||^2) w          (left as it is where ||w||^2 <= eps),

so the update cannot simply scale the weights (the direction that drives the logits of a
memorising network towards numerical overflow). The inner products run over each parameter tensor
as a whole.
"""
from __future__ import annotations

from typing import Callable, Optional, Type

import torch


class OrthoGrad(torch.optim.Optimizer):
    """``OrthoGrad(params, base=torch.optim.SGD, *, eps=1e-8, **kw)``: project each gradient
    orthogonally to its parameter, then step ``base(params, **kw)``.

    Args:
        params: the parameters or parameter groups, as for any optimiser.
        base: the optimiser class that takes the step (``torch.optim.AdamW``, ...).
        eps: the projection is skipped for a parameter with ``||w||^2 <= eps`` (a zero-initialised
            bias has no direction to remove).
        **kw: the base optimiser's arguments (``lr``, ``weight_decay``, ...).

    ``param_groups`` and ``state`` are the base optimiser's, so learning-rate schedulers and
    ``state_dict`` / ``load_state_dict`` work as for the base.
    """

    def __init__(self, params, base: Type[torch.optim.Optimizer] = torch.optim.SGD, *, eps: float = 1e-8, **kw):
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
            raise TypeError(f"base must be a torch.optim.Optimizer class (e.g. torch.optim.AdamW), got {base!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.base = base(params, **kw)
        self.eps = float(eps)
        # Share the base's groups, defaults and state: one set of hyperparameters and one state.
        self.defaults = self.base.defaults
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    def __repr__(self) -> str:
        return f"OrthoGrad(eps={self.eps}, base={self.base!r})"

    @torch.no_grad()
    def project_(self) -> None:
        """Remove from each gradient its component along its parameter (in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.detach().reshape(-1), p.grad.reshape(-1)
                ww = torch.dot(w, w)
                coeff = torch.where(ww > self.eps, torch.dot(w, g) / torch.where(ww > self.eps, ww, 1.0), 0.0)
                p.grad.sub_(coeff * p.detach())

    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.project_()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
