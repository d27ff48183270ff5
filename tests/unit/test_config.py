"""BidKVConfig: sources, precedence, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_bidkv.config import _FIELDS, SIZE_UNITS, BidKVConfig, markdown_table

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_active() -> None:
    config = BidKVConfig.from_sources({}, {})
    assert config.enabled and config.active and config.offload_enabled
    assert config.victim_policy == "bidkv" and config.admission == "fcfs"


def test_env_overrides_extra_config() -> None:
    config = BidKVConfig.from_sources(
        {"victim_policy": "random", "cpu_bytes": "512MiB", "offload_mode": "eager"},
        {"BIDKV_VICTIM_POLICY": "largest-first", "BIDKV_SEED": "7"},
    )
    assert config.victim_policy == "largest-first"  # env wins
    assert config.cpu_bytes == 512 * 2**20 and config.offload_mode == "eager" and config.seed == 7


@pytest.mark.parametrize("env", [{"BIDKV_DISABLE": "1"}, {"BIDKV_ENABLED": "false"}])
def test_disable_switches(env: dict[str, str]) -> None:
    config = BidKVConfig.from_sources({"enabled": True}, env)
    assert not config.enabled and not config.active and not config.offload_enabled


def test_kill_switch_is_stock_behaviour() -> None:
    config = BidKVConfig.from_sources({"kill_switch": True}, {})
    assert config.enabled and not config.active and not config.offload_enabled


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("victim_policy", "lifo", "one of bidkv"),
        ("admission", "priority", "one of fcfs, sjf"),
        ("offload_mode", "always", "one of auto, lazy, eager, off"),
        ("cpu_eviction", "mru", "one of lru, bid"),
        ("copy_backend", "cuda", "one of auto, triton, torch"),
        ("cpu_bytes", "lots", "a whole number of bytes, or a number with a unit: B, KB, MB, GB, TB, KiB"),
        ("cpu_bytes", 0, ">= 1 byte"),
        ("cpu_bytes", "3 parsecs", "a number with a unit"),
        ("cpu_bytes", "1PiB", "KiB, MiB, GiB, TiB"),
        ("cpu_bytes", "0.5B", "a whole number of bytes"),
        ("cpu_bytes", float("inf"), "a whole number of bytes"),
        ("cpu_bytes", 2.5, "a whole number of bytes"),
        ("disk_bytes", "1PiB", "KiB, MiB, GiB, TiB"),
        ("disk_bytes", 0, ">= 1 byte"),
        ("enabled", "maybe", "a boolean: true/false, 1/0, yes/no, on/off"),
        ("kill_switch", 2, "a boolean"),
        ("seed", -1, "an integer >= 0"),
        ("seed", 1.5, "an integer >= 0"),
        ("seed", float("inf"), "an integer >= 0"),
        ("seed", float("nan"), "an integer >= 0"),
        ("lazy_lookahead_steps", 0.1, "a finite float >= 0.5"),
        ("bid_load_cost", "cheap", "a finite float >= 0"),
        ("bid_epsilon", 0.0, "a finite float >= 1e-12"),
        ("bid_progress_weight", True, "a finite float >= 0"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=key) as err:
        BidKVConfig.from_sources({key: value}, {})
    assert expected in str(err.value)
    with pytest.raises(ValueError, match=key):  # the same check for the env var
        BidKVConfig.from_sources({}, {f"BIDKV_{key.upper()}": str(value)})


FLOAT_KEYS = [key for key, field in _FIELDS.items() if field.type is float]


@pytest.mark.parametrize(
    "value", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf"), float("-inf")]
)
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_nan_and_infinities_are_refused_for_every_float_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{key}=.* is invalid; expected a finite float"):
        BidKVConfig.from_sources({key: value}, {})
    with pytest.raises(ValueError, match=f"{key}=.* is invalid; expected a finite float"):
        BidKVConfig.from_sources({}, {f"BIDKV_{key.upper()}": str(value)})


def test_every_float_key_is_covered() -> None:
    assert set(FLOAT_KEYS) >= {"lazy_lookahead_steps", "bid_epsilon", "bid_load_cost"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1TiB", 2**40),
        ("1 TiB", 2**40),
        ("2TB", 2 * 10**12),
        ("1tib", 2**40),
        ("0.5TiB", 2**39),
        ("1.5GiB", 3 * 2**29),
        ("512MiB", 512 * 2**20),
        ("8GB", 8 * 10**9),
        ("3KB", 3000),
        ("3KiB", 3072),
        ("7MB", 7 * 10**6),
        ("10B", 10),
        ("4096", 4096),
    ],
)
def test_sizes_accept_decimal_and_binary_units(text: str, expected: int) -> None:
    assert BidKVConfig.from_sources({"cpu_bytes": text}, {}).cpu_bytes == expected
    assert BidKVConfig.from_sources({}, {"BIDKV_CPU_BYTES": text}).cpu_bytes == expected


def test_size_units_are_decimal_and_binary_up_to_tera() -> None:
    assert {
        "B": 1,
        **{f"{p}B": 1000**i for i, p in enumerate("KMGT", 1)},
        **{f"{p}iB": 1024**i for i, p in enumerate("KMGT", 1)},
    } == SIZE_UNITS
    for unit, size in SIZE_UNITS.items():
        assert BidKVConfig(cpu_bytes=f"3{unit}").cpu_bytes == 3 * size


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "vllm_bidkv.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_cli_config_accepts_a_tib_tier() -> None:
    result = run_cli("config", env={"BIDKV_CPU_BYTES": "1TiB"})
    assert result.returncode == 0, result.stderr
    assert '"cpu_bytes": 1099511627776' in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ("config",),
            {"BIDKV_CPU_BYTES": "1PiB"},
            "vllm-bidkv config: cpu_bytes='1PiB' is invalid; expected",
        ),
        (
            ("config",),
            {"BIDKV_LAZY_LOOKAHEAD_STEPS": "nan"},
            "lazy_lookahead_steps='nan' is invalid; expected a finite float >= 0.5",
        ),
        (
            ("config",),
            {"BIDKV_VICTIM_POLICY": "lifo"},
            "victim_policy='lifo' is invalid; expected one of bidkv",
        ),
        (("bench", "select", "--sizes", "0"), {}, "argument --sizes: 0 is not >= 1"),
        (("bench", "select-e2e", "--sizes", "16,x"), {}, "argument --sizes: 'x' is not an integer"),
        (("bench", "sim", "--preset", "nope"), {}, "unknown preset 'nope'; known:"),
    ],
)
def test_cli_bad_value_is_a_message_and_a_nonzero_exit(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_disk_tier_needs_the_cpu_tier_and_takes_sizes() -> None:
    config = BidKVConfig.from_sources({"disk_path": "/nvme/kv", "disk_bytes": "2TiB"}, {})
    assert config.disk_path == "/nvme/kv" and config.disk_bytes == 2 * 2**40
    assert BidKVConfig().disk_path == "", "off by default"
    with pytest.raises(ValueError, match="disk_path=7 is invalid; expected a path"):
        BidKVConfig.from_sources({"disk_path": 7}, {})
    with pytest.raises(
        ValueError, match="disk_path='/nvme/kv' is invalid; expected '' while offload_mode='off'"
    ):
        BidKVConfig.from_sources({"disk_path": "/nvme/kv", "offload_mode": "off"}, {})


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'victim_polcy'.*known keys"):
        BidKVConfig.from_sources({"victim_polcy": "random"}, {})


def test_unknown_env_var_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    # bidkv (PyPI) uses the same prefix; its variables must not break us.
    config = BidKVConfig.from_sources({}, {"BIDKV_STRATEGY": "bidkv"})
    assert config == BidKVConfig()
    assert "BIDKV_STRATEGY" in caplog.text


def test_markdown_table_lists_every_key() -> None:
    table = markdown_table()
    for key in _FIELDS:
        assert f"`{key}`" in table and f"BIDKV_{key.upper()}" in table


def test_readme_config_table_is_generated() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README's config table is stale: paste `vllm-bidkv config --markdown`"


def test_every_name_list_is_declared_once_and_agrees_with_its_users() -> None:
    """config.py declares each list of names; the modules that act on them accept exactly those."""
    from vllm_bidkv import config, kernels
    from vllm_bidkv.offload import CpuBlockTier, OffloadSpec
    from vllm_bidkv.policy import STRATEGIES
    from vllm_bidkv.policy.admission import admission_key

    assert kernels.BACKENDS == config.COPY_BACKENDS
    assert set(STRATEGIES) == set(config.VICTIM_POLICIES)
    for eviction in config.CPU_EVICTIONS:
        CpuBlockTier(1, eviction)
    with pytest.raises(ValueError, match="cpu_eviction"):
        CpuBlockTier(1, "fifo")
    for mode in config.OFFLOAD_MODES:
        spec = OffloadSpec.from_config(config.BidKVConfig(offload_mode=mode), num_slots=1)
        assert (spec is None) == (mode == "off") and (spec is None or spec.mode == mode)
    for admission in config.ADMISSIONS:
        admission_key(admission)
