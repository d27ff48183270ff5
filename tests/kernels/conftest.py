"""Fixtures for the kernel tests.

The Triton kernel runs on CPU tensors in Triton's interpreter. ``@triton.jit`` picks the
interpreter when ``TRITON_INTERPRET=1`` at decoration time, i.e. when
``vllm_bidkv.kernels.triton_copy`` is imported, so the ``triton_copy`` fixture sets the variable
only around that import (re-executing the module if something imported it compiled before).
The variable is then restored: other tests, and the engine processes they spawn, must not
inherit it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

TRITON_MODULE = "vllm_bidkv.kernels.triton_copy"


@pytest.fixture(scope="session")
def triton_copy() -> Iterator[ModuleType]:
    pytest.importorskip("triton")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(TRITON_MODULE)
        if not module.is_interpreted():
            module = importlib.reload(sys.modules[TRITON_MODULE])
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.is_interpreted()
    yield module
