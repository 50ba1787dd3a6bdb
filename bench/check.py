"""Correctness check that runs before any timing: every fused backend against
the reference forward-mode path on the same probes (penalty and gradients)."""
import copy

import torch

from grokalign_fast import GrokAlign


def check_fused_matches_reference(model0, x, backend, rtol):
    grads = {}
    pens = {}
    for be in ("reference", backend):
        model = copy.deepcopy(model0)
        reg = GrokAlign(model, 1.0, estimator="forward", backend=be, generator=torch.Generator().manual_seed(0),
                        probes="rademacher")
        out, pen = reg(x)
        (out.square().mean() + pen).backward()
        pens[be] = pen.detach()
        grads[be] = [p.grad for p in model.parameters()]
    torch.testing.assert_close(pens[backend], pens["reference"], rtol=rtol, atol=0)
    for a, b in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
