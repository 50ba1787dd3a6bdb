"""The README's API tour runs as written."""
import pathlib
import re

import torch

import grokalign_fast as ga

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    torch.manual_seed(0)
    scope = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert scope["penalty"].requires_grad
    # The tour ends on the ResNet: the dual-stream engine, with the extension's epilogues where it is
    # built, and the reasons of the backends that cannot serve.
    cpp = ga.available_backends()["cpp"]
    assert scope["reg"].last_backend == ("cpp" if cpp is None else "dual")
    # "triton" runs the engine with its epilogues wherever Triton runs (on the CPU, its interpreter).
    assert scope["reg"].last_plan.reasons["triton"] == ga._backends.triton_unavailable_reason(torch.device("cpu"))
    assert scope["reg"].last_plan.reasons["cpp"] == cpp
