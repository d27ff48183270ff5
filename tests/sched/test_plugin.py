"""The plugin entry point, the disable switch, reversibility, and `vllm-bidkv doctor`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_bidkv.patches.capabilities import probe

pytestmark = pytest.mark.sched


def expected_patches() -> list[str]:
    """A vLLM carrying the source patch binds the connector itself: no runtime patch."""
    return [] if probe().vllm_binds_context else ["scheduler_bind_hook"]


PROBE = r"""
import json, sys
from importlib.metadata import entry_points
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.block_pool import BlockPool
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
classes = (Scheduler, KVCacheManager, BlockPool)
before = {c.__name__: dict(vars(c)) for c in classes}
registered_before = "BidKVConnector" in KVConnectorFactory._registry
(ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vllm_bidkv"]
ep.load()()
changed = sorted(f"{c.__name__}.{k}" for c in classes for k, v in vars(c).items() if before[c.__name__].get(k) is not v)
print(json.dumps({"changed": changed, "registered": "BidKVConnector" in KVConnectorFactory._registry,
                  "registered_before": registered_before}))
"""


def run_probe(**env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_registers_connector_and_patches_only_scheduler_init() -> None:
    result = run_probe()
    assert result["registered"] and not result["registered_before"]
    patched = ["Scheduler.__init__", "Scheduler._bidkv_original_init"]
    assert result["changed"] == (patched if expected_patches() else [])


def test_disable_leaves_every_vllm_attribute_untouched() -> None:
    result = run_probe(BIDKV_DISABLE="1")
    assert result["changed"] == [] and not result["registered"]


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


def test_doctor_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vllm_bidkv.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert {"vllm_version", "capabilities", "patches", "supported"} <= report.keys()
    assert report["supported"] is True and report["patches"] == expected_patches()
    assert report["capabilities"] == probe().as_dict()
