"""bench soak's arithmetic: the flags it refuses, the plan, the slope it fits, the targets it judges."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from vllm_bidkv_bench import soak

pytestmark = pytest.mark.unit


def _args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    soak.add_cli_args(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"configs": "bidkv-lazy"}, "stock (the control) included"),
        ({"configs": "stock,bidkv"}, "from stock, bidkv-lazy"),
        ({"configs": "stock,stock"}, "each name once"),
        ({"warmup_share": 1.0}, "--warmup-share 1.0 must be in [0, 1)"),
        ({"max_tokens": 1}, "--max-tokens 1 must be >= 2"),
        ({"resets": -1}, "--resets -1 must be >= 0"),
    ],
)
def test_bad_flags_name_the_flag(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="vllm-bidkv bench soak: ") as err:
        soak.check_args(_args(**overrides))
    assert message in str(err.value)


def test_every_config_gets_the_same_plan_with_the_asked_share_hung_up() -> None:
    args = _args(requests=1000, seed=3)
    pool = [f"prompt {i}" for i in range(10)]
    plan = soak.request_plan(args, pool)
    assert plan == soak.request_plan(args, pool)
    hang_ups = [after for _, after in plan if after is not None]
    assert len(hang_ups) == 200 and all(1 <= a < args.max_tokens for a in hang_ups)


def test_the_slope_is_fitted_after_warm_up_only() -> None:
    # 1 MiB per request during warm-up, then 100 bytes per request.
    samples = [
        {"done": d, "rss": 2**30 + 2**20 * min(d, 200) + 100 * max(d - 200, 0)} for d in range(0, 1001, 50)
    ]
    slope, _ = soak.fit_line(samples, after=200) or (None, None)
    assert slope == pytest.approx(100)
    assert soak.fit_line(samples[:2], after=0) is None


def _record(config: str, slope: float, **counts: int) -> dict[str, Any]:
    outcomes = dict.fromkeys(soak.OUTCOMES, 0) | counts
    return {
        "config": config,
        "counts": outcomes,
        "accounted": sum(outcomes.values()),
        "rss_slope_bytes_per_request": slope,
        "idle_at_end": True,
        "probes_equal_stock": True,
        "counters_end": {"vllm:bidkv_cpu_evictions_total": 5.0},
        "working_set_ratio": 4.0,
    }


def test_targets_count_every_request_and_judge_the_slope_against_stock() -> None:
    args = _args(requests=10000)
    stock = _record("stock", 3000.0, completed=8000, cancelled=2000)
    assert all(soak.targets(stock, stock, args).values())
    # Above 1 KB per request but no steeper than stock's: met.
    ours = _record("bidkv-lazy", 2500.0, completed=8000, cancelled=2000)
    assert all(soak.targets(ours, stock, args).values())
    steeper = _record("bidkv-lazy", 3500.0, completed=8000, cancelled=2000)
    assert not soak.targets(steeper, stock, args)["RSS slope <= 1 KB/request or <= stock's"]
    lost = _record("bidkv-lazy", 0.0, completed=7999, cancelled=2000)
    assert not soak.targets(lost, stock, args)["every request accounted for"]
    failed = _record("bidkv-lazy", 0.0, completed=7999, cancelled=2000, failed=1)
    met = soak.targets(failed, stock, args)
    assert met["every request accounted for"] and not met["0 failed that were not cancelled"]


def test_the_tiers_size_in_blocks_comes_from_the_models_own_shape(tmp_path: Any) -> None:
    """The tiny model (2 layers, 4 heads of 64, 2 KV heads) has 64 KiB blocks of 32 float32
    tokens, which is what the servers report; another shape gives its own size."""
    import json

    tiny = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    assert soak.kv_block_bytes(str(tmp_path), 32) == 64 * 1024
    other = {"num_hidden_layers": 6, "hidden_size": 768, "num_attention_heads": 12, "head_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps(other))
    assert soak.kv_block_bytes(str(tmp_path), 16, dtype_bytes=2) == 6 * 2 * 12 * 32 * 2 * 16
