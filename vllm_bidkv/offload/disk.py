"""DiskTier: a disk tier behind the CPU tier, with an index that survives a restart.

Write-through, as vLLM's own tiering cascades stores from its CPU tier: every entry the
CPU tier commits is *spilled* (its CPU slot written to a disk slot on a worker thread,
never on the step's path), so the CPU tier evicts without writing anything. A hit on a
block the CPU tier no longer holds is *promoted*: the load reads it from disk into a
fresh CPU slot, then copies it to the GPU like any CPU hit, and the slot is a CPU entry
once every worker did both. A disk that is full, busy or unwritable drops stores
(``disk_store_drops``) and never fails a request; a failed read is a load error (vLLM
recomputes it).

The index is a ``CpuBlockTier`` over the disk's slots: PENDING while a spill writes, READY
once every worker wrote it, pinned while a promotion reads it, LRU eviction. A spill's
source CPU slot is pinned until every worker wrote it, so no store overwrites it first.

Its READY entries are journaled in SQLite (``index.sqlite3`` in the disk directory, beside
one data file per worker): an entry only once every worker wrote its data, a removal
before its slot is sent to another spill (``sync`` runs before each step's plan goes out).
A restart on the same directory restores the index, unless the fingerprint (model, KV
layout, vLLM release, prefix-hash root) differs: then a warning names what differs and
the old contents are discarded. One engine at a time holds the directory (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

from vllm_bidkv.context import BlockHash
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload.cpu_tier import CpuBlockTier

logger = logging.getLogger("vllm_bidkv")

INDEX_FILE = "index.sqlite3"
LOCK_FILE = "lock"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entry (hash BLOB PRIMARY KEY, slot INTEGER NOT NULL, used INTEGER NOT NULL)",
)


@dataclass(frozen=True)
class DiskSpec:
    path: str
    """This engine's disk directory (``disk_path``, per data-parallel rank if several)."""
    num_slots: int
    """Disk-tier slots, one block each (``disk_bytes`` per worker over a worker's block)."""
    fingerprint: tuple[tuple[str, str], ...] = ()
    """What the old contents must have been written with to be reused (key, value)."""


def data_file(path: str, rank: int, world_size: int) -> str:
    """One worker's data file: slot ``s`` is its share of a block at ``s`` x its row bytes."""
    return os.path.join(path, f"rank{rank}-of-{world_size}.kv")


class DiskTier:
    """The scheduler's map of the disk tier and its journal (see module doc)."""

    def __init__(self, spec: DiskSpec, counters: Counters, announce: bool = False) -> None:
        self.spec = spec
        self.index = CpuBlockTier(
            spec.num_slots, "lru", counters, announce=True, evictions_counter="disk_evictions"
        )
        self._counters = counters
        self._announce = announce  # keep the changes for vLLM's KV events too
        self._events: list[tuple[BlockHash, bool]] = []
        self._used: list[BlockHash] = []  # promoted since the last sync: they move to the MRU end
        self._db: sqlite3.Connection | None = None
        self._clock = 0  # the journal's use order
        self._lock: IO[bytes] | None = None  # a file object: closed (unlocked) if this is collected
        self.usable = False  # opened, and the directory is ours
        self.opened = False

    # -- start ---------------------------------------------------------------------
    def open(self, fingerprint: Mapping[str, str]) -> int:
        """Take the directory and restore what an earlier engine left there if it was written
        with the same ``fingerprint`` (the spec's plus what is known only now). Call once,
        before the first lookup. Returns the entries restored. Never raises: a directory it
        cannot use is logged and every store is dropped."""
        assert not self.opened, "the disk tier is opened once"
        self.opened = True
        expected = {**dict(self.spec.fingerprint), **fingerprint}
        try:
            os.makedirs(self.spec.path, exist_ok=True)
            self._lock = open(os.path.join(self.spec.path, LOCK_FILE), "ab")  # noqa: SIM115 - held until close
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            db = self._connect()
            row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            entries = db.execute("SELECT hash, slot, used FROM entry ORDER BY used").fetchall()
            written = json.loads(row[0]) if row is not None else None
            if written != expected:
                if written is not None and entries:
                    logger.warning(
                        "vllm-bidkv: the disk tier at %s holds %d blocks of another model or KV layout (%s); "
                        "they are discarded",
                        self.spec.path,
                        len(entries),
                        _mismatch(written, expected),
                    )
                with db:
                    db.execute("DELETE FROM entry")
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (json.dumps(expected),)
                    )
                entries = []
        except (OSError, sqlite3.Error, ValueError) as err:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            logger.warning(
                "vllm-bidkv: disk_path=%s cannot be used (%s): every store to the disk tier is dropped",
                self.spec.path,
                "another engine holds it" if isinstance(err, BlockingIOError) else err,
            )
            return 0
        self._db, self.usable = db, True
        kept = [(bytes(h), slot) for h, slot, _ in entries if 0 <= slot < self.spec.num_slots]
        self._clock = max((used for _, _, used in entries), default=0) + 1
        self._restore(kept)
        return len(kept)

    def _connect(self) -> sqlite3.Connection:
        """The journal, created if absent; one that is not a database (a torn or foreign file)
        is started anew, with a warning: its entries are lost, the disk tier is not."""
        path = os.path.join(self.spec.path, INDEX_FILE)
        for attempt in range(2):
            db = sqlite3.connect(path, check_same_thread=False)
            try:
                with db:
                    for statement in _SCHEMA:
                        db.execute(statement)
                return db
            except sqlite3.DatabaseError as err:
                db.close()
                if attempt or isinstance(err, sqlite3.OperationalError):  # e.g. a read-only disk
                    raise
                logger.warning(
                    "vllm-bidkv: the disk tier's index %s is unreadable (%s): started anew", path, err
                )
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path + suffix)
        raise AssertionError("unreachable")

    def _restore(self, entries: list[tuple[BlockHash, int]]) -> None:
        # Through the index's own API: reserves hand out the lowest slot first, so reserving
        # a placeholder for every gap puts each entry in its slot; committing in use order
        # rebuilds the LRU order.
        by_slot = dict((slot, h) for h, slot in entries)
        top = max(by_slot, default=-1) + 1
        for slot in range(top):
            got = self.index.reserve(by_slot.get(slot, b"\0gap" + slot.to_bytes(8, "little")))
            assert got == slot, f"restore: slot {slot} reserved as {got}"
        for slot in range(top):
            if slot not in by_slot:
                self.index.abort(slot)
        for _, slot in entries:
            self.index.commit(slot)
        restored = self.index.take_announcements()  # already in the journal
        if self._announce:
            self._events.extend(restored)

    # -- spills (CPU tier -> disk) ---------------------------------------------------
    def reserve_spills(self, tier: CpuBlockTier, cpu_slots: list[int]) -> tuple[list[int], list[int]]:
        """Disk slots for CPU-tier entries just committed that the disk lacks; pins their CPU
        slots. Returns (CPU slots, disk slots) of the spill to issue; the others are dropped
        (counted) when the disk has no slot to give (all busy, or it cannot be used)."""
        src: list[int] = []
        dst: list[int] = []
        for slot in cpu_slots:
            block_hash = tier.hash_of(slot)
            assert block_hash is not None, f"CPU slot {slot} holds no entry"
            if self.index.contains(block_hash):
                continue
            disk_slot = self.index.reserve(block_hash) if self.usable else None
            if disk_slot is None:
                self._counters.add("disk_store_drops")
                continue
            tier.pin(slot)
            src.append(slot)
            dst.append(disk_slot)
        return src, dst

    def spill_finished(
        self, tier: CpuBlockTier, cpu_slots: list[int], disk_slots: list[int], ok: bool
    ) -> None:
        """Every worker reported the spill: commit (or drop) its disk slots, unpin its CPU slots."""
        for slot, disk_slot in zip(cpu_slots, disk_slots, strict=True):
            tier.unpin(slot)
            if ok:
                self.index.commit(disk_slot)
            else:
                self.index.abort(disk_slot)
        self._counters.add("disk_blocks_written" if ok else "disk_store_drops", len(disk_slots))

    # -- promotions (disk -> CPU tier, for a load) -----------------------------------------
    def has(self, block_hash: BlockHash) -> bool:
        """The disk holds this hash's data (READY)."""
        return self.index.lookup(block_hash) is not None

    def promote(self, tier: CpuBlockTier, block_hash: BlockHash) -> tuple[int, int] | None:
        """A fresh CPU slot (PENDING) for a disk entry a load reads, and the disk slot (pinned);
        None if the disk lacks it or the CPU tier has no slot for it."""
        disk_slot = self.index.lookup(block_hash)
        if disk_slot is None or tier.contains(block_hash):
            return None
        slot = tier.reserve(block_hash)
        if slot is None:
            return None
        self.index.pin(disk_slot)
        return slot, disk_slot

    def promotion_finished(self, tier: CpuBlockTier, slot: int, disk_slot: int, ok: bool) -> None:
        """Every worker reported the load: the CPU slot is an entry (or dropped, with the disk
        entry: its data is suspect); the disk entry moves to the MRU end."""
        block_hash = tier.hash_of(slot)
        self.index.unpin(disk_slot, drop=not ok)
        if ok:
            tier.commit(slot)
            self._counters.add("disk_blocks_read")
            assert block_hash is not None
            self._used.append(block_hash)
        else:
            tier.abort(slot)

    # -- journal, events, resets ---------------------------------------------------------
    def sync(self) -> None:
        """Journal the index's changes since the last call (before a step's plan is sent)."""
        changes = self.index.take_announcements()
        if self._announce:
            self._events.extend(changes)
        used, self._used = self._used, []
        if self._db is None or not (changes or used):
            return
        last = dict(changes)  # a hash's last change is its state now
        rows = []
        for block_hash, stored in last.items():
            if stored:
                rows.append((block_hash, self.index.lookup(block_hash), self._clock))
                self._clock += 1
        touched = [(self._clock + i, h) for i, h in enumerate(used) if h not in last]
        self._clock += len(touched)
        try:
            with self._db:
                self._db.executemany(
                    "DELETE FROM entry WHERE hash = ?", [(h,) for h, stored in last.items() if not stored]
                )
                self._db.executemany("INSERT OR REPLACE INTO entry VALUES (?, ?, ?)", rows)
                self._db.executemany("UPDATE entry SET used = ? WHERE hash = ?", touched)
        except sqlite3.Error as err:
            logger.warning("vllm-bidkv: the disk tier's index cannot be written (%s): no warm restart", err)
            self._db = None

    def take_events(self) -> list[tuple[BlockHash, bool]]:
        """Changes of the READY set since the last call, for vLLM's KV events (with ``announce``)."""
        events, self._events = self._events, []
        return events

    def reset(self) -> None:
        """vLLM's ``reset_prefix_cache``: nothing on disk is a hit any more."""
        self.index.reset()

    def close(self) -> None:
        self.sync()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def _mismatch(written: Mapping[str, str], expected: Mapping[str, str]) -> str:
    """What differs, e.g. ``model: 'a' on disk, 'b' now``, with a hint for the hash root."""
    keys = [k for k in sorted({*written, *expected}) if written.get(k) != expected.get(k)]
    text = "; ".join(f"{k}: {written.get(k)!r} on disk, {expected.get(k)!r} now" for k in keys)
    if keys == ["prefix_hash_root"]:
        text += (
            " (vLLM seeds its prefix hashes at random with a non-cryptographic hash algorithm: "
            "set PYTHONHASHSEED to the same value on every start)"
        )
    return text


def is_ready(tier: CpuBlockTier, disk: DiskTier | None, block_hash: BlockHash) -> bool:
    """A load can read ``block_hash``: READY in the CPU tier, or in the disk tier behind it."""
    return tier.lookup(block_hash) is not None or (disk is not None and disk.has(block_hash))


def hold_for_load(
    tier: CpuBlockTier, disk: DiskTier | None, hashes: list[BlockHash]
) -> tuple[list[int], list[int]]:
    """The slots a load reads ``hashes`` from, held for it, for the longest prefix of them the
    tiers can serve: CPU hits pinned (all first, so that no promotion evicts a later hit), then
    each disk-only block promoted (``DiskTier.promote``). Returns (CPU slots, disk slots or -1),
    one per hash served; the CPU hits past the first block not served are unpinned again."""
    hits = [tier.lookup(block_hash) for block_hash in hashes]
    for slot in hits:
        if slot is not None:
            tier.pin(slot)
    slots: list[int] = []
    disk_slots: list[int] = []
    for i, (block_hash, slot) in enumerate(zip(hashes, hits, strict=True)):
        disk_slot = -1
        if slot is None:
            promoted = disk.promote(tier, block_hash) if disk is not None else None
            if promoted is None:
                for later in hits[i + 1 :]:
                    if later is not None:
                        tier.unpin(later)
                break
            slot, disk_slot = promoted
        slots.append(slot)
        disk_slots.append(disk_slot)
    return slots, disk_slots


def release_load(
    tier: CpuBlockTier,
    disk: DiskTier | None,
    slots: list[int],
    disk_slots: list[int],
    *,
    ok: bool,
    keep: bool,
) -> None:
    """Every worker reported the load: unpin its CPU hits (dropped if it failed: the data is
    suspect) and end its promotions (kept only if ``ok`` and ``keep``: not after a reset)."""
    for slot, disk_slot in zip(slots, disk_slots or [-1] * len(slots), strict=True):
        if disk_slot < 0:
            tier.unpin(slot, drop=not ok)
        else:
            assert disk is not None
            disk.promotion_finished(tier, slot, disk_slot, ok and keep)
