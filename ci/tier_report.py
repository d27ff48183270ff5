"""pytest plugin (``-p tier_report``): per-tier counts and durations as JSON for ci/matrix.py.

One pytest process runs all of a release's tiers (imports are paid once); this
plugin splits the outcome by tier marker and writes it to ``$BIDKV_TIER_REPORT``,
with the capability table probed from the vLLM the tests imported.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any

import pytest

TIERS = ("unit", "sched", "engine", "kernels")

_tier_of: dict[str, str] = {}
_outcome: dict[str, str] = {}
_duration: dict[str, float] = defaultdict(float)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: a test with no tier would vanish silently
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marks = [m.name for m in item.iter_markers() if m.name in TIERS]
        _tier_of[item.nodeid] = marks[0] if marks else "unmarked"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _duration[report.nodeid] += report.duration
    if report.failed:
        _outcome[report.nodeid] = "failed" if report.when == "call" else "error"
    elif report.skipped:
        _outcome.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcome.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("BIDKV_TIER_REPORT")
    if not path:
        return
    tiers: dict[str, dict[str, Any]] = {}
    for nodeid, outcome in _outcome.items():
        tier = tiers.setdefault(
            _tier_of.get(nodeid, "unmarked"),
            {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "seconds": 0.0, "failures": [], "tests": {}},
        )
        tier[outcome] += 1
        tier["seconds"] = round(tier["seconds"] + _duration[nodeid], 2)
        tier["tests"][nodeid] = round(_duration[nodeid], 2)  # COMPAT.md: where the time goes
        if outcome in ("failed", "error"):
            tier["failures"].append(nodeid)
    report = {
        "exitstatus": int(exitstatus),
        "tiers": tiers,
        "unmarked": sorted(n for n, tier in _tier_of.items() if tier == "unmarked"),
        "capabilities": _capabilities(),
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _capabilities() -> dict[str, Any] | None:
    if "vllm" not in sys.modules:
        return None
    from vllm_bidkv.patches.capabilities import probe

    probe.cache_clear()  # a test may have faked the version
    caps = probe()
    return {**caps.as_dict(), "verdict": caps.verdict()}
