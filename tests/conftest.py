"""Shared fixtures. Tiers: unit (no vllm), sched (real Scheduler), engine (real vLLM engine), kernels."""

from __future__ import annotations

import os

import pytest

# Keep engine/sched runs quiet and deterministic on the 2-core CI box.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_bidkv.tiny_model import tiny_model_dir

    return str(tiny_model_dir())
