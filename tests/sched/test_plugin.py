"""The plugin entry point, the disable switch and reversibility (doctor: test_capabilities.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_bidkv.patches.capabilities import probe

pytestmark = pytest.mark.sched


def expected_patches() -> list[str]:
    """A vLLM carrying the source patch binds the connector itself: no runtime patch."""
    return [] if probe().vllm_binds_context else ["scheduler_bind_hook"]


# One process (an import of vLLM costs ~10 s, on every release row): vLLM's plugin loader
# runs the entry point with BIDKV_DISABLE=1, then again without it.
PROBE = r"""
import json, os
from importlib.metadata import entry_points
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.block_pool import BlockPool
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
classes = (Scheduler, KVCacheManager, BlockPool)
(ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vllm_bidkv"]
out = {}
for name, disable in (("disabled", "1"), ("enabled", "0")):
    os.environ["BIDKV_DISABLE"] = disable
    before = {c.__name__: dict(vars(c)) for c in classes}
    registered_before = "BidKVConnector" in KVConnectorFactory._registry
    ep.load()()
    changed = sorted(
        f"{c.__name__}.{k}" for c in classes for k, v in vars(c).items() if before[c.__name__].get(k) is not v
    )
    out[name] = {"changed": changed, "registered": "BidKVConnector" in KVConnectorFactory._registry,
                 "registered_before": registered_before}
print(json.dumps(out))
"""


def test_plugin_patches_only_scheduler_init_and_disable_touches_nothing() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["disabled"] == {"changed": [], "registered": False, "registered_before": False}
    assert result["enabled"]["registered"] and not result["enabled"]["registered_before"]
    patched = ["Scheduler.__init__", "Scheduler._bidkv_original_init"]
    assert result["enabled"]["changed"] == (patched if expected_patches() else [])


def test_apply_and_revert_are_idempotent() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_bidkv import patches

    original, expected = Scheduler.__init__, expected_patches()
    try:
        assert patches.apply() == expected
        patched = Scheduler.__init__
        assert patches.apply() == expected and Scheduler.__init__ is patched
    finally:
        assert patches.revert() == expected
    assert patches.revert() == [] and Scheduler.__init__ is original and patches.applied() == []
