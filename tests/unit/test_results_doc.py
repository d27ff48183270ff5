"""RESULTS.md's tournament targets: ratios of medians over seeds, each seed's range beside them."""

from __future__ import annotations

from typing import Any

import pytest
from vllm_bidkv_bench.presets import TOURNAMENTS
from vllm_bidkv_bench.resultsdoc import _reruns_lines, tournament_summary, tournament_targets

pytestmark = pytest.mark.unit


def record(config: str, run: int, p50: float, p99: float, rps: float) -> dict[str, Any]:
    return {"config": config, "rate": 1.0, "run": run, "ttft_p50_ms": p50, "ttft_p99_ms": p99,
            "throughput_rps": rps, "prefill_tokens_computed": 1000}  # fmt: skip


def test_a_target_is_the_ratio_of_medians_and_its_range_is_each_seeds_ratio() -> None:
    """Ours 100/90/120 ms against a peer's 100 on seeds 0-2: the target reads 1.000 (the medians)
    whatever one seed says, and the range 0.900-1.200 shows the seeds that disagree."""
    ours = [record("bidkv+offload", run, p50, 200, 2.0) for run, p50 in enumerate((100, 90, 120))]
    peer = [record("vllm-offloading", run, 100, 180, 2.0) for run in range(3)]
    rule = [record("lcf", run, 300, 400, 1.5) for run in range(3)]
    bound = [record("oracle", run, 50, 190, 2.0) for run in range(3)]
    data = {"sim-chat-cpu1x": ([*ours, *peer, *rule, *bound], {})}
    rows = {row[0].split(": ", 1)[1]: row for row in tournament_targets(data)}
    _, rate, measured, seeds, threshold, verdict = rows[
        "p50 TTFT bidkv+offload / best other (vllm-offloading)"
    ]
    assert (rate, measured, seeds, threshold, verdict) == ("1.0", "1.000", "0.900–1.200", "≤ 1.02", "**met**")
    _, _, measured, seeds, _, verdict = rows["p99 TTFT bidkv+offload / best other (vllm-offloading)"]
    assert (measured, seeds, verdict) == ("1.111", "1.111–1.111", "missed")
    assert rows["p99 TTFT bidkv+offload / oracle"][2:4] == ("1.053", "1.053–1.053")
    summary = "\n".join(tournament_summary(data))
    assert "| testbed | every other | 1/1 | 0/1 | 1/1 | 1/1 |" in summary
    # With one seed there is no range to show.
    one = {"sim-chat-cpu1x": ([r for r in data["sim-chat-cpu1x"][0] if r["run"] == 0], {})}
    assert all(row[3] == "–" for row in tournament_targets(one))


def test_testbed_tournaments_run_three_seeds() -> None:
    """The targets are medians of at least three seeds (issue 26)."""
    assert all(p.runs >= 3 for p in TOURNAMENTS)


def test_a_section_says_which_configs_ran_again_and_why() -> None:
    """A section whose configs were run again after it was recorded says so above its tables."""
    assert _reruns_lines({}) == []
    rerun = {"configs": ["bidkv+offload", "ideal-tier"], "why": "the link model", "elapsed_s": 90.0}
    lines = _reruns_lines({"reruns": [rerun]})
    assert lines[0].startswith("Run again (1.5 min): `bidkv+offload`, `ideal-tier`; the link model.")
    assert lines[-1] == ""
