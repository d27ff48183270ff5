"""Shared fixtures. Tiers: unit (no vllm), sched (real Scheduler), engine (real vLLM engine), kernels.

``--reverse`` runs the collected tests in reverse order: every tier must pass in one process
in both orders (``pytest -m "unit or sched or engine or kernels" [--reverse]``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Keep engine/sched runs quiet and deterministic on the 2-core CI box.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the collected tests in reverse order (order-dependence check)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def _no_patch_left_behind() -> Iterator[None]:
    """Revert the runtime patches a test applied and did not revert (``bench.sim.simulate``, for
    one, applies them for the rest of the process, as a benchmark run should), so each test starts
    from the state it would have alone, whatever ran before. Patches already in place when the
    test started are kept. Looks only at modules already imported: no unit test imports vLLM here.
    """
    before = _applied()
    yield
    after = _applied()
    if after and not before:
        from vllm_bidkv import patches

        patches.revert()


def _applied() -> list[str]:
    """The runtime patches in place; none can be before vLLM and ``vllm_bidkv.patches`` are imported."""
    if "vllm" not in sys.modules or "vllm_bidkv.patches" not in sys.modules:
        return []
    from vllm_bidkv import patches

    return patches.applied()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    return str(tiny_model_dir())
