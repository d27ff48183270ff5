"""``vllm-bidkv top``'s parsing and rendering, the scheduler side's gauges and counter deltas (no vLLM, no torch)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from tests.support.planner_machine import SimRequest, tokens
from tests.unit.test_scheduler_side import Rig, park_prompt
from vllm_bidkv.counters import COUNTERS, GAUGES, IDLE_ZERO_GAUGES, Counters
from vllm_bidkv.offload import JobResults
from vllm_bidkv.step_events import StepEvents
from vllm_bidkv.top import ROWS, Snapshot, metrics_url, parse_metrics, render, run_top, summarize

pytestmark = pytest.mark.unit

METRICS = """\
# HELP vllm:bidkv_tier_used_bytes x
# TYPE vllm:bidkv_tier_used_bytes gauge
vllm:bidkv_tier_used_bytes{engine="0",model_name="m"} 1048576.0
vllm:bidkv_tier_used_bytes{engine="1",model_name="m"} 1048576.0
# TYPE vllm:bidkv_tier_capacity_bytes gauge
vllm:bidkv_tier_capacity_bytes{engine="0",model_name="m"} 8388608.0
# TYPE vllm:bidkv_tier_entries gauge
vllm:bidkv_tier_entries{engine="0",model_name="m"} 32.0
# TYPE vllm:bidkv_tokens_loaded counter
vllm:bidkv_tokens_loaded_total{engine="0",model_name="m"} 640.0
# TYPE vllm:bidkv_recomputed_tokens counter
vllm:bidkv_recomputed_tokens_total{engine="0",model_name="m"} 32.0
# TYPE vllm:bidkv_bytes_stored counter
vllm:bidkv_bytes_stored_total{engine="0",model_name="m"} 2097152.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.2
"""


def test_parse_sums_label_sets_and_skips_buckets() -> None:
    values = parse_metrics(METRICS)
    assert values["vllm:bidkv_tier_used_bytes"] == 2 * 2**20  # two engines
    assert values["vllm:bidkv_tokens_loaded_total"] == 640
    assert values["vllm:time_to_first_token_seconds_count"] == 3
    assert not any(name.endswith("_bucket") for name in values)


def test_parse_rejects_garbage_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot parse /metrics"):
        parse_metrics("vllm:x{engine=0 1\n")


def test_summary_rows_and_rates() -> None:
    prev = Snapshot("http://a:1", 10.0, parse_metrics(METRICS))
    values = dict(
        prev.values, **{"vllm:bidkv_bytes_stored_total": prev.values["vllm:bidkv_bytes_stored_total"] + 2**21}
    )
    cur = Snapshot("http://a:1", 12.0, values)
    rows = summarize(cur, prev)
    assert list(rows) == list(ROWS)
    assert rows["tier used"] == "2.0 MiB / 8.0 MiB (25.0%)"
    assert rows["tier entries"] == "32"
    assert rows["GPU prefix hit rate"] == "25.0%"
    assert rows["CPU tier hit rate (new requests)"] == "-"  # no queries: no rate, not 0%
    assert rows["tokens loaded / recomputed"] == "640 / 32"
    assert rows["stored GPU→CPU"] == "4.0 MiB (1.0 MiB/s)"
    assert rows["loaded CPU→GPU"] == "0 B (-)" or rows["loaded CPU→GPU"] == "0 B (0 B/s)"
    assert rows["disk tier used"] == "no disk tier"
    assert summarize(cur)["stored GPU→CPU"].endswith("(-)")  # one sample: no rate
    disk = {
        "vllm:bidkv_disk_capacity_bytes": 4.0 * 2**30,
        "vllm:bidkv_disk_used_bytes": 2.0**30,
        "vllm:bidkv_disk_blocks_written_total": 70.0,
        "vllm:bidkv_disk_blocks_read_total": 12.0,
        "vllm:bidkv_disk_store_drops_total": 3.0,
    }
    with_disk = summarize(Snapshot("http://a:1", 12.0, dict(values, **disk)))
    assert with_disk["disk tier used"] == "1.0 GiB / 4.0 GiB (25.0%)"
    assert with_disk["disk blocks written / read / dropped"] == "70 / 12 / 3"
    no_bidkv = summarize(Snapshot("http://a:1", 1.0, {"vllm:num_requests_running": 2.0}))
    assert no_bidkv["tier used"] == "no bidkv gauges"
    assert summarize(Snapshot("http://a:1", 1.0, error="refused"))["tier used"] == "error: refused"


def test_render_has_a_column_per_server() -> None:
    snaps = [Snapshot("http://a:1", 1.0, parse_metrics(METRICS)), Snapshot("http://b:2", 1.0, error="down")]
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(render(snaps, plain=True))
    text = out.getvalue()
    assert "http://a:1" in text and "http://b:2" in text and "error: down" in text
    assert "25.0%" in text and all(row.split(" (")[0] in text for row in ROWS)
    assert all(ord(ch) < 128 or ch == "→" for ch in text), "plain output uses ASCII borders"


def test_run_top_once_with_a_fetcher() -> None:
    out = io.StringIO()
    calls: list[str] = []

    def fetcher(url: str) -> Snapshot:
        calls.append(url)
        return Snapshot(url, float(len(calls)), parse_metrics(METRICS))

    console = Console(file=out, width=160, color_system=None)
    assert run_top(["http://a:1"], once=True, interval=0.01, console=console, fetcher=fetcher) == 0
    assert calls == ["http://a:1", "http://a:1"] and "tier entries" in out.getvalue()
    down = run_top(
        ["http://a:1"], once=True, interval=0.01, console=console, fetcher=lambda u: Snapshot(u, 0, error="x")
    )
    assert down == 1


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://h:1", "http://"])
def test_bad_url_names_the_option(url: str) -> None:
    with pytest.raises(ValueError, match="--url"):
        metrics_url(url)
    with pytest.raises(ValueError, match="--url"):
        run_top([url], once=True, fetcher=lambda u: Snapshot(u, 0))


def test_metrics_url_forms() -> None:
    assert metrics_url("http://h:8000") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/metrics/") == "http://h:8000/metrics"


def test_top_imports_neither_vllm_nor_torch() -> None:
    script = "import json, sys\nimport vllm_bidkv.top\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    modules = json.loads(out.stdout.splitlines()[-1])
    assert not [m for m in modules if m.split(".")[0] in ("vllm", "torch")]


def test_gauges_follow_jobs_and_requests_back_to_idle() -> None:
    rig = Rig(slots=16)
    side = rig.side
    assert set(side.gauges()) == set(GAUGES)
    assert side.gauges()["tier_capacity_bytes"] == 16 * 64 and side.gauges()["tier_entries"] == 0
    prompt = tokens(1, 16)
    park_prompt(rig, prompt)
    parked = side.gauges()
    assert parked["tier_entries"] == 4 and parked["tier_used_bytes"] == 4 * 64
    assert all(parked[g] == 0 for g in IDLE_ZERO_GAUGES)

    request = SimRequest("a", prompt + tokens(2, 3))
    rig.admit(request)  # a CPU hit: a load is planned, its slots pinned
    busy = side.gauges()
    assert busy["tracked_requests"] == 1 and busy["tier_pinned_entries"] == 4
    plan = side.plan_step(StepEvents())
    assert side.gauges()["loads_in_flight"] == 1 and side.gauges()["gpu_blocks_held"] == 4
    side.complete(JobResults(done={job.job_id: 1 for job in plan.jobs()}))
    assert side.gauges()["loads_in_flight"] == 0 and side.gauges()["tier_pinned_entries"] == 0
    rig.finish(request)
    rig.step()
    idle = side.gauges()
    assert all(idle[g] == 0 for g in IDLE_ZERO_GAUGES), idle
    rig.idle()


def test_gauges_without_offload_count_requests_only() -> None:
    rig = Rig(offload_mode="off")
    assert rig.side.planner is None
    request = SimRequest("a", tokens(1, 8))
    rig.admit(request)
    assert rig.side.gauges() == dict.fromkeys(GAUGES, 0) | {"tracked_requests": 1}
    rig.finish(request)
    assert rig.side.gauges() == dict.fromkeys(GAUGES, 0)


@given(st.lists(st.one_of(st.none(), st.tuples(st.sampled_from(sorted(COUNTERS)), st.integers(0, 5)))))
def test_counter_deltas_add_up_to_the_totals_and_are_empty_without_an_event(
    ops: list[tuple[str, int] | None],
) -> None:
    """None: a stats report (take_deltas). Each report carries the non-zero increases since the
    previous one, none when nothing was added since (vLLM then gets no report), and the
    reports sum to the totals."""
    counters, reported, added_since = Counters(), dict.fromkeys(COUNTERS, 0), False
    for op in [*ops, None]:
        if op is None:
            deltas = counters.take_deltas()
            assert all(v > 0 for v in deltas.values())
            assert added_since or deltas == {}
            for name, value in deltas.items():
                reported[name] += value
            assert reported == counters.totals()
            added_since = False
        else:
            counters.add(*op)
            added_since = True
