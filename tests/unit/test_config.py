"""BidKVConfig: sources, precedence, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_bidkv.config import _FIELDS, BidKVConfig, markdown_table

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
        ("offload_mode", "always", "one of lazy, eager, off"),
        ("cpu_eviction", "mru", "one of lru, bid"),
        ("copy_backend", "cuda", "one of auto, triton, torch"),
        ("cpu_bytes", "lots", "bytes as a number"),
        ("cpu_bytes", 0, ">= 1"),
        ("cpu_bytes", "3 parsecs", "bytes as a number"),
        ("enabled", "maybe", "a boolean"),
        ("kill_switch", 2, "a boolean"),
        ("seed", -1, ">= 0"),
        ("seed", 1.5, "a whole number"),
        ("lazy_lookahead_steps", 0.1, ">= 0.5"),
        ("bid_load_cost", "cheap", "a float"),
        ("bid_epsilon", 0.0, ">= 1e-12"),
        ("bid_progress_weight", True, "a float"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=key) as err:
        BidKVConfig.from_sources({key: value}, {})
    assert expected in str(err.value)
    with pytest.raises(ValueError, match=key):  # the same check for the env var
        BidKVConfig.from_sources({}, {f"BIDKV_{key.upper()}": str(value)})


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


def test_pure_packages_never_import_vllm() -> None:
    code = (
        "import sys, vllm_bidkv, vllm_bidkv.config, vllm_bidkv.context, vllm_bidkv.policy, vllm_bidkv.offload;"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_config_table_is_generated() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README's config table is stale: paste `vllm-bidkv config --markdown`"
