"""The test harness's own machinery (``conftest.py``), where a mistake would make
tests slower or wrong without any test of the package failing."""

from __future__ import annotations

import os

import pytest
import torch

import triton_adadelta

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the tests' interpreter runs only")


@interpreted
def test_the_interpreter_patches_the_language_once_per_launch(monkeypatch):
    """conftest's speed-up: one real patch of ``triton.language`` per launch (nested
    ``@triton.jit`` calls reuse it), and the language is restored after the launch."""
    import triton.language as tl
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_once_per_launch", False), "conftest's interpreter patch is not installed"
    patched_bodies, launches = [], []
    patch_core = interpreter._patch_lang_core
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda lang, scope: (patched_bodies.append(lang), patch_core(lang, scope))[1])
    launch = interpreter.GridExecutor.__call__
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", lambda self, *a, **k: (launches.append(self), launch(self, *a, **k))[1])
    original_load = tl.load

    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 7)]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = triton_adadelta.Adadelta(params)
    optimizer.step()
    optimizer.step()

    assert launches, "no kernel launch ran under the interpreter"
    # fp32 params and state: no tl.rand, so the only patch is each launch's own, of `tl`.
    assert patched_bodies == [tl] * len(launches)
    assert tl.load is original_load
