from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import build_scheduler, make_request, model_output

from vllm_bidkv import patches
from vllm_bidkv.patches.capabilities import probe

BLOCK_SIZE = 16


@pytest.fixture
def patched() -> Iterator[None]:
    """The runtime patches applied for one test (the plugin does this in real processes)."""
    patches.apply()
    yield
    patches.revert()


@pytest.fixture
def offload_supported() -> None:
    """Skips a test of the CPU tier where vLLM cannot report copy completions (capability
    ``connector_worker_meta``, 0.19+): the connector refuses offload there by design, and
    ``test_connector_scheduler.py::test_offload_needs_worker_meta`` asserts that refusal."""
    if not probe().connector_worker_meta:
        pytest.skip("offload is refused without build_connector_worker_meta (by design)")


@pytest.fixture
def make_scheduler(tiny_model: str) -> Callable[..., Any]:
    def factory(**kwargs: Any) -> Any:
        kwargs.setdefault("num_gpu_blocks", 64)
        kwargs.setdefault("block_size", BLOCK_SIZE)
        return build_scheduler(tiny_model, **kwargs)

    return factory


def add_requests(
    scheduler: Any, n: int, seed: int = 0, prefix_len: int = 0, lo: int = 20, hi: int = 120, max_out: int = 40
) -> dict[str, Any]:
    """n requests with random prompts; the first ``prefix_len`` tokens shared by all."""
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 500) for _ in range(prefix_len)]
    requests = {}
    for i in range(n):
        prompt = prefix + [rng.randrange(1, 500) for _ in range(rng.randint(lo, hi))]
        req = make_request(
            f"req-{seed}-{i}", prompt, rng.randint(4, max_out), block_size=scheduler.block_size
        )
        requests[req.request_id] = req
        scheduler.add_request(req)
    return requests


def run_to_completion(
    scheduler: Any, requests: dict[str, Any], max_steps: int = 10_000, on_step: Any = None
) -> int:
    steps = 0
    while scheduler.has_requests():
        out = scheduler.schedule()
        if on_step is not None:
            on_step(out)
        scheduler.update_from_output(out, model_output(out, requests))
        steps += 1
        assert steps < max_steps, "scheduler did not drain"
    return steps
