"""The disk tier's index and journal (``offload.disk``), on real files: what a restart gets
back, what it refuses, and what a disk it cannot use does. The planner's traffic through it
(spills, promotions, failures, resets) is ``PlannerMachine``'s (tests/support), which runs
with a disk tier in some examples and restores the journal at the end of each."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from tests.support.planner_machine import chain_hashes, tokens
from tests.support.read_only import read_only_dir
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload import CpuBlockTier, OffloadSpec
from vllm_bidkv.offload.disk import INDEX_FILE, DiskSpec, DiskTier

pytestmark = pytest.mark.unit

FINGERPRINT = (("model", "tiny"), ("block_bytes_per_worker", "4096"))
ROOT = {"prefix_hash_root": "ab"}


def disk_tier(path: Path, slots: int = 8, fingerprint: tuple[tuple[str, str], ...] = FINGERPRINT) -> DiskTier:
    return DiskTier(DiskSpec(str(path), slots, fingerprint), Counters())


def stored(cpu: CpuBlockTier, hashes: list[bytes]) -> list[int]:
    """Commit ``hashes`` to the CPU tier (stores done); their slots."""
    slots = []
    for block_hash in hashes:
        slot = cpu.reserve(block_hash)
        assert slot is not None
        cpu.commit(slot)
        slots.append(slot)
    return slots


def spill_all(disk: DiskTier, cpu: CpuBlockTier, hashes: list[bytes]) -> None:
    """Store ``hashes`` in the CPU tier and spill them, as the planner does, every worker done."""
    src, dst = disk.reserve_spills(cpu, stored(cpu, hashes))
    disk.spill_finished(cpu, src, dst, ok=True)
    disk.sync()


def written_by_an_engine(path: Path, hashes: list[bytes]) -> None:
    """An engine that stored ``hashes``, every one written to disk, and stopped."""
    disk = disk_tier(path)
    disk.open(ROOT)
    spill_all(disk, CpuBlockTier(16), hashes)
    disk.close()


def test_a_restart_restores_every_entry_in_its_slot_and_lru_order(tmp_path: Path) -> None:
    hashes = chain_hashes(tokens(1, 4 * 6), 4)
    disk, cpu = disk_tier(tmp_path), CpuBlockTier(16)
    assert disk.open(ROOT) == 0
    spill_all(disk, cpu, hashes)
    disk.index.drop(hashes[2])  # a hole: slot 2 is free after the restart too
    slot_of = {h: disk.index.lookup(h) for h in hashes}
    # A promotion of hashes[0] is a use: it leaves the LRU end.
    slot, disk_slot = disk.promote(cpu, hashes[0]) or (None, None)
    assert slot is None, "the CPU tier still holds it: nothing to promote"
    cpu.drop(hashes[0])
    promoted = disk.promote(cpu, hashes[0])
    assert promoted is not None
    disk.promotion_finished(cpu, *promoted, ok=True)
    disk.close()

    again = disk_tier(tmp_path)
    assert again.open(ROOT) == 5
    assert {h: again.index.lookup(h) for h in hashes} == slot_of
    again.index.check()
    # Evictions follow the old use order: hashes[1] was the least recently used, hashes[0] the most.
    assert again.index.num_free == 3
    fresh = chain_hashes(tokens(2, 4 * 5), 4)
    taken = [again.index.reserve(h) for h in fresh]
    assert taken[:3] == [2, 6, 7], "free slots first, lowest first"
    assert taken[3:] == [slot_of[hashes[1]], slot_of[hashes[3]]], "then the LRU entries"
    again.close()


def test_another_model_is_refused_with_a_message_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written_by_an_engine(tmp_path, chain_hashes(tokens(1, 12), 4))
    other = disk_tier(tmp_path, fingerprint=(("model", "other"), ("block_bytes_per_worker", "4096")))
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        assert other.open(ROOT) == 0
    assert "holds 3 blocks of another model or KV layout (model: 'tiny' on disk, 'other' now)" in caplog.text
    assert other.index.num_used == 0
    other.close()
    # The refusal is final: the old entries are gone from the journal, the new fingerprint kept.
    third = disk_tier(tmp_path, fingerprint=(("model", "other"), ("block_bytes_per_worker", "4096")))
    assert third.open(ROOT) == 0
    third.close()


def test_another_prefix_hash_root_names_pythonhashseed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written_by_an_engine(tmp_path, chain_hashes(tokens(1, 4), 4))
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        assert disk_tier(tmp_path).open({"prefix_hash_root": "cd"}) == 0
    assert "prefix_hash_root: 'ab' on disk, 'cd' now" in caplog.text and "PYTHONHASHSEED" in caplog.text


def test_a_smaller_disk_keeps_the_entries_that_fit(tmp_path: Path) -> None:
    hashes = chain_hashes(tokens(1, 4 * 6), 4)
    written_by_an_engine(tmp_path, hashes)
    smaller = disk_tier(tmp_path, slots=4)
    assert smaller.open(ROOT) == 4
    assert [smaller.index.lookup(h) for h in hashes] == [0, 1, 2, 3, None, None]
    smaller.close()


def test_a_directory_held_by_another_engine_drops_stores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, cpu = disk_tier(tmp_path), CpuBlockTier(16)
    first.open(ROOT)
    second = disk_tier(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        assert second.open(ROOT) == 0
    assert "another engine holds it" in caplog.text and not second.usable
    assert second.reserve_spills(cpu, stored(cpu, chain_hashes(tokens(1, 8), 4))) == ([], [])
    assert second.index.counters["disk_store_drops"] == 2 and cpu.num_pins == 0
    first.close()


def test_a_read_only_directory_drops_stores(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with read_only_dir(tmp_path / "ro") as path:
        disk, cpu = disk_tier(path), CpuBlockTier(4)
        with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
            assert disk.open(ROOT) == 0
        assert f"disk_path={path} cannot be used" in caplog.text
        assert disk.reserve_spills(cpu, stored(cpu, [b"h" * 32])) == ([], [])
        assert disk.index.counters["disk_store_drops"] == 1


def test_the_journal_never_names_a_slot_before_its_write_finished(tmp_path: Path) -> None:
    disk, cpu = disk_tier(tmp_path), CpuBlockTier(16)
    disk.open(ROOT)
    slots = stored(cpu, chain_hashes(tokens(1, 8), 4))
    src, dst = disk.reserve_spills(cpu, slots)
    assert cpu.num_pins == 2, "a spill pins its sources until every worker wrote them"
    disk.sync()
    journal = sqlite3.connect(tmp_path / INDEX_FILE)
    assert journal.execute("SELECT count(*) FROM entry").fetchone() == (0,)
    disk.spill_finished(cpu, src, dst, ok=False)  # a failed write: dropped, counted, not journaled
    assert disk.index.counters["disk_store_drops"] == 2 and cpu.num_pins == 0
    disk.sync()
    assert journal.execute("SELECT count(*) FROM entry").fetchone() == (0,)
    src, dst = disk.reserve_spills(cpu, slots)
    disk.spill_finished(cpu, src, dst, ok=True)
    disk.sync()
    assert journal.execute("SELECT count(*) FROM entry").fetchone() == (2,)
    disk.reset()  # vLLM's reset_prefix_cache: old KV is never loaded again, after a restart either
    disk.sync()
    assert journal.execute("SELECT count(*) FROM entry").fetchone() == (0,)
    disk.close()


def test_the_spec_refuses_a_disk_tier_without_slots() -> None:
    with pytest.raises(ValueError, match="disk tier slots=0 is invalid"):
        OffloadSpec(mode="lazy", num_slots=4, disk=DiskSpec("/tmp/x", 0))


def test_with_kv_events_the_announced_set_is_the_disk_index(tmp_path: Path) -> None:
    """For vLLM's KV events (medium STORAGE): what is announced is what the disk holds, and a
    restart announces what it restored."""
    disk, cpu = DiskTier(DiskSpec(str(tmp_path), 2, FINGERPRINT), Counters(), announce=True), CpuBlockTier(16)
    disk.open(ROOT)
    hashes = chain_hashes(tokens(1, 12), 4)
    spill_all(disk, cpu, hashes[:2])
    spill_all(disk, cpu, hashes[2:])  # a 2-slot disk evicts the oldest
    announced: set[bytes] = set()
    for block_hash, stored in disk.take_events():
        (announced.add if stored else announced.discard)(block_hash)
    assert announced == {h for h in hashes if disk.has(h)} == {hashes[1], hashes[2]}
    disk.close()
    again = DiskTier(DiskSpec(str(tmp_path), 2, FINGERPRINT), Counters(), announce=True)
    again.open(ROOT)
    assert sorted(again.take_events()) == sorted((h, True) for h in announced)
    again.close()


def test_an_unreadable_index_is_started_anew(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    written_by_an_engine(tmp_path, chain_hashes(tokens(1, 8), 4))
    (tmp_path / INDEX_FILE).write_bytes(b"not a database, a torn copy" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / (INDEX_FILE + suffix)).unlink(missing_ok=True)
    disk, cpu = disk_tier(tmp_path), CpuBlockTier(16)
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        assert disk.open(ROOT) == 0
    assert "is unreadable" in caplog.text and disk.usable
    spill_all(disk, cpu, chain_hashes(tokens(2, 8), 4))
    disk.close()
    again = disk_tier(tmp_path)
    assert again.open(ROOT) == 2, "the new journal works"
    again.close()
