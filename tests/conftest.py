"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpreter(monkeypatch):
    """Two fixes to Triton 3.6's interpreter: loop bounds computed from program ids become ``int(array of shape
    (1,))``, which NumPy >= 2.4 rejects (use ``.item()``); and ``tl.dot`` multiplies bf16 tiles as the uint16
    arrays that store them (convert to fp32 first: a bf16 product is exact in fp32, as on tensor cores)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    create_dot = interp.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interp.TensorHandle(
            interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32
        )

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", dot)


@pytest.fixture(scope="module")
def server():
    """``diffv2 serve`` over a float64 tiny model on a free port, one per test module (``tests/serving.py``)."""
    from .serving import tiny_server

    with tiny_server() as srv:
        yield srv


@pytest.fixture
def observe(server):
    """``observe(fn)`` adds a scheduler observer of ``server`` for one test; returns ``fn``."""
    added = []

    def add(observer):
        server.scheduler.observers.append(observer)
        added.append(observer)
        return observer

    yield add
    for observer in added:
        server.scheduler.observers.remove(observer)
