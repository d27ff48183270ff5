"""``bench sim --loads``: the simulator's stock capacity, rates at fractions of it; the presets' shapes."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
from vllm_bidkv_bench import presets
from vllm_bidkv_bench.cli import _matrix_args, matrix_from_args
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.metrics import percentile
from vllm_bidkv_bench.presets import PRESETS, PRODUCTION, TOURNAMENTS, get_preset
from vllm_bidkv_bench.runner import PROBE_RATE, PROBE_THINK_SCALE, measure_capacity, run_matrix
from vllm_bidkv_bench.sim import simulate
from vllm_bidkv_bench.workloads import make_workload

pytestmark = pytest.mark.sched


def sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _matrix_args(parser, "sim")
    args = parser.parse_args(argv)
    args.kind = "sim"
    return args


def probe_capacity(preset: presets.BenchPreset, seed: int) -> float:
    """Stock's throughput with every request at once, measured here independently of the runner."""
    probe = make_workload(
        preset.workload,
        preset.num_requests,
        PROBE_RATE,
        seed,
        preset.length_scale,
        preset.max_model_len,
        PROBE_THINK_SCALE,
    )
    timings = simulate(probe, CONFIGS["stock"], preset, H100_LLAMA3_8B).timings
    finishes = [t.finish_s for t in timings if t.finish_s is not None]
    assert len(finishes) == len(timings)
    return len(timings) / (max(finishes) - min(t.arrival_s for t in timings))


@pytest.mark.usefixtures("offload_supported")  # every simulator matrix runs ideal-tier
@pytest.mark.parametrize("workload", ["mixed", "multi-round-qa"])
def test_bench_sim_loads_run_at_fractions_of_stocks_capacity(workload: str) -> None:
    """``bench sim --loads``: stock's capacity first (every request at once, seeded), then every
    config at round(load × capacity); every record carries the calibration and its load."""
    args = sim_args(
        "--preset", f"h100-llama3-8b-{workload}-cpu1x", "--num-requests", "24", "--configs", "stock",
        "--runs", "1", "--loads", "0.5,0.8", "--seed", "3",
    )  # fmt: skip
    matrix = matrix_from_args(args)
    assert matrix.loads == (0.5, 0.8) and matrix.calibration is None
    capacity = probe_capacity(matrix.preset, seed=3)
    records = run_matrix(matrix, progress=False)
    rates = [round(0.5 * capacity, 3), round(0.8 * capacity, 3)]
    assert not any("error" in r for r in records)
    assert {r["config"] for r in records} == {"stock", "unbounded", "ideal-tier"}
    assert sorted({r["rate"] for r in records}) == rates
    for r in records:
        cal = r["calibration"]
        assert cal["capacity_rps"] == pytest.approx(capacity)
        assert cal["loads"] == [0.5, 0.8] and cal["rates"] == rates and cal["kind"] == "sim"
        assert "simulator" in cal["probe"] and "seed 3" in cal["probe"]
        assert cal["think_scale"] == matrix.preset.think_scale  # simulated think times stay the workload's
        assert r["load"] == (0.5 if r["rate"] == rates[0] else 0.8)
    # Deterministic: the probe measures the same capacity again.
    assert measure_capacity(matrix)["capacity_rps"] == cal["capacity_rps"]


@pytest.mark.usefixtures("offload_supported")
def test_rates_turn_sim_calibration_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """--rates gives absolute req/s on a calibrated preset: no probe runs, no record is calibrated."""
    import vllm_bidkv_bench.runner as runner

    def no_probe(matrix: object) -> None:
        raise AssertionError("--rates must not measure a capacity")

    monkeypatch.setattr(runner, "measure_capacity", no_probe)
    args = sim_args(
        "--preset", "h100-llama3-8b-mixed-cpu1x", "--num-requests", "6", "--configs", "stock",
        "--runs", "1", "--rates", "2",
    )  # fmt: skip
    matrix = matrix_from_args(args)
    assert matrix.loads == () and matrix.rates == [2.0]
    records = run_matrix(matrix, progress=False)
    assert {r["rate"] for r in records} == {2.0} and not any("error" in r for r in records)
    assert not any("calibration" in r or "load" in r for r in records)


# -- the presets' shapes -----------------------------------------------------------------------
def test_production_pool_is_derived_from_the_h100_at_0_9() -> None:
    """80 GiB × 0.9 − 16 GB of weights − 1.25 GiB reserve, in 2 MiB blocks of 16 tokens."""
    budget = 80 * 2**30 * 0.9 - 16e9 - 1.25 * 2**30
    assert presets.KV_BYTES_PER_TOKEN == H100_LLAMA3_8B.kv_bytes_per_token == 131_072
    assert presets.PROD_GPU_BLOCKS == int(budget // (16 * 131_072)) == 28_594
    lo, hi = presets.PROD_POOL_TOKENS_RANGE
    assert lo <= presets.PROD_GPU_BLOCKS * 16 <= hi


def test_production_presets_have_the_derived_shape() -> None:
    pool_bytes = presets.PROD_GPU_BLOCKS * 16 * 131_072
    names = {p.name for p in PRODUCTION}
    assert names == {
        f"h100-llama3-8b-prod-{w}-cpu{t}x"
        for w in ("multi-round-qa", "long-doc-qa", "agentic", "chat")
        for t in (10, 30)
    }
    lo, hi = presets.PROD_POOL_TOKENS_RANGE
    for p in PRODUCTION:
        assert PRESETS[p.name] is p
        assert lo <= p.num_gpu_blocks * p.block_size <= hi and p.block_size == 16
        assert (p.max_num_seqs, p.max_num_batched_tokens, p.max_model_len) == (256, 8192, 131_072)
        tier = int(p.name.rsplit("-cpu", 1)[1].removesuffix("x"))
        assert p.cpu_bytes == tier * pool_bytes
        assert p.loads == (0.5, 0.8, 0.95) and p.rates == () and p.capacity_probe == "knee"
        assert p.configs == presets.PROD_CONFIGS and set(p.configs) <= set(CONFIGS)
        assert {"stock", "vllm-offloading", "vllm-simple-offload", "bidkv+offload", "oracle"} <= set(
            p.configs
        )
        assert p.cost_model == "h100-llama3-8b"


def test_production_agentic_sessions_are_20_to_60k_tokens() -> None:
    preset = get_preset("h100-llama3-8b-prod-agentic-cpu10x")
    for seed in range(3):
        workload = make_workload("agentic", 600, 1.0, seed, preset.length_scale, preset.max_model_len)
        assert workload.sessions is not None
        for plan in workload.sessions.plans:
            final = len(plan.first_prompt) + sum(plan.output_lens) + sum(len(m) for m in plan.messages)
            assert 20_000 <= final <= 60_000


def test_testbed_tournaments_are_calibrated_and_cover_the_field_shapes() -> None:
    from vllm_bidkv_bench.resultsdoc import SECTIONS

    workloads = {p.workload for p in TOURNAMENTS}
    assert workloads == {"mixed", "long-context", "chat", "agentic", "rag", "multi-round-qa", "long-doc-qa"}
    for p in TOURNAMENTS:
        assert p.loads == (0.5, 0.8, 0.95) and p.rates == ()
        assert (p.num_gpu_blocks, p.max_num_seqs) == (600, 32)
    sections = {s.name: s for s in SECTIONS if s.tournament}
    prod = {f"sim-prod-{w}-cpu{t}x" for w in presets.PROD_WORKLOADS for t in presets.PROD_CPU_TIERS}
    assert set(sections) == {f"sim-{w}-cpu{t}x" for w in workloads for t in (1, 10)} | prod
    for s in sections.values():
        assert get_preset(s.preset).loads == (0.5, 0.8, 0.95)


def test_production_shape_runs_in_the_simulator() -> None:
    preset = replace(get_preset("h100-llama3-8b-prod-chat-cpu10x"), num_requests=8)
    workload = make_workload("chat", 8, 4.0, 0, 1.0, preset.max_model_len)
    result = simulate(workload, CONFIGS["stock"], preset, H100_LLAMA3_8B)
    assert all(t.finish_s is not None for t in result.timings) and len(result.timings) == 8
    assert result.num_gpu_blocks == presets.PROD_GPU_BLOCKS - 1  # minus vLLM's null block


@pytest.mark.usefixtures("offload_supported")
def test_knee_probe_finds_the_rate_where_stocks_ttft_leaves_its_light_load_value() -> None:
    """``capacity_probe: knee``: the capacity is a rate whose TTFT p50 (measured here, not by
    the runner) stays within KNEE × the light load's, and KNEE_PRECISION above it one did not;
    loads run at fractions of it; a preset differing only in its CPU tier reuses the measure."""
    import vllm_bidkv_bench.runner as runner

    preset = replace(get_preset("h100-llama3-8b-mixed-cpu1x"), num_requests=120, capacity_probe="knee")
    args = sim_args("--num-requests", "120", "--configs", "stock", "--runs", "1", "--loads", "0.5,0.8")
    matrix = replace(matrix_from_args(args), preset=preset)

    def p50(rate: float) -> float:
        workload = make_workload("mixed", 120, rate, 0, preset.length_scale, preset.max_model_len)
        timings = simulate(workload, CONFIGS["stock"], preset, H100_LLAMA3_8B).timings
        return percentile([1e3 * (t.first_token_s - t.arrival_s) for t in timings], 50)  # type: ignore[operator]

    runner._SIM_CAPACITIES.clear()
    cal = measure_capacity(matrix)
    capacity, tried = cal["capacity_rps"], dict((r, v) for r, v in cal["knee_probes"])
    light = cal["at_once_rps"] / 4
    limit = runner.KNEE * tried[round(light, 4)]
    assert p50(capacity) <= limit
    above = [r for r, v in tried.items() if v > limit]
    assert above and min(above) <= capacity * runner.KNEE_PRECISION * 1.001
    assert cal["rates"] == [round(0.5 * capacity, 3), round(0.8 * capacity, 3)]
    assert cal["think_scale"] == pytest.approx(preset.think_scale / capacity)  # users live at any rate
    assert "TTFT p50" in cal["probe"] and cal["capacity_rps"] != cal["at_once_rps"]
    # The same shape with another CPU tier: no second measurement.
    calls = len(runner._SIM_CAPACITIES)
    bigger = replace(matrix, preset=replace(preset, name="other", cpu_bytes=10 * preset.cpu_bytes))
    assert measure_capacity(bigger) == cal and len(runner._SIM_CAPACITIES) == calls


@pytest.mark.usefixtures("offload_supported")
def test_knee_probe_without_a_knee_keeps_the_all_at_once_throughput() -> None:
    """A closed loop whose users all fit in one batch never queues: past KNEE_MAX_AT_ONCE × the
    all-at-once throughput the probe stops, and that throughput is the capacity."""
    import vllm_bidkv_bench.runner as runner

    preset = replace(get_preset("h100-llama3-8b-prod-chat-cpu10x"), num_requests=16)
    args = sim_args("--num-requests", "16", "--configs", "stock", "--runs", "1", "--loads", "0.5")
    matrix = replace(matrix_from_args(args), preset=preset)
    runner._SIM_CAPACITIES.clear()
    cal = measure_capacity(matrix)
    assert cal["capacity_rps"] == cal["at_once_rps"] and "no knee" in cal["probe"]
    assert max(rate for rate, _ in cal["knee_probes"]) <= runner.KNEE_MAX_AT_ONCE * cal["at_once_rps"]
    assert cal["think_scale"] == pytest.approx(preset.think_scale / cal["capacity_rps"])
