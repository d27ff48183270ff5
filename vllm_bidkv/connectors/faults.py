"""A test hook, opt-in and never for production: copy failures and late completions on purpose.

``FaultPlan`` fails copies of the worker side (``CopyWorker``) on purpose (load jobs:
every Nth or those writing chosen GPU blocks; store batches; with ``mid_batch`` after
copying half) and holds completions back (``complete_after_steps``: each report waits
that many more steps, as an unfinished CUDA event would). A JSON list gives one plan
per ``rank`` (one TP rank failing while another is slow).

It lives in the runtime package because it must run where the copies run: inside
vLLM's worker processes, which a test cannot reach into. It is read there from
``VLLM_BIDKV_FAULTS`` (JSON, when the first ``CopyWorker`` is built, in each worker
process) and only with the opt-in ``VLLM_BIDKV_TEST_HOOKS=1`` too, else refused at
start-up; in-process, a test calls ``set_faults``. Without either it does nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from vllm_bidkv.offload import TransferJob

logger = logging.getLogger("vllm_bidkv")

FAULTS_ENV = "VLLM_BIDKV_FAULTS"
TEST_HOOKS_ENV = "VLLM_BIDKV_TEST_HOOKS"


class InjectedFault(RuntimeError):
    """The error a ``FaultPlan`` raises inside a copy."""


@dataclass
class FaultPlan:
    """Test hook: which copies fail on purpose and how late completions arrive (see the
    module doc). Not for production.

    ``load_every``: every Nth load job fails (1: all; 0: none). ``load_blocks``: a load
    job writing any of these GPU block ids fails. ``store_every``: every Nth store batch
    (one step's rescues, or one step's post-forward stores) fails. ``mid_batch``: a
    failing copy first copies the first half of its blocks, then raises.
    ``complete_after_steps``: every copy is reported that many steps after the step that
    issued it (done or failed), loads, rescues and stores alike.
    ``rank``: only the worker of this global rank uses the plan (None: every worker).
    ``injected``: what was failed so far (jobs and blocks by kind), for tests.
    """

    load_every: int = 0
    load_blocks: frozenset[int] = frozenset()
    store_every: int = 0
    mid_batch: bool = False
    rank: int | None = None
    complete_after_steps: int = 0
    injected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("load_jobs", "load_blocks", "store_jobs", "store_blocks"), 0)
    )
    _loads_seen: int = 0
    _stores_seen: int = 0

    KEYS = ("load_every", "load_blocks", "store_every", "mid_batch", "rank", "complete_after_steps")

    @classmethod
    def from_json(cls, text: str) -> list[FaultPlan]:
        """Parse ``VLLM_BIDKV_FAULTS``: one plan (an object) or one per rank (a list of them).
        An unknown key or a bad value raises ValueError naming it."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV} is not JSON: {err}") from err
        specs = spec if isinstance(spec, list) else [spec]
        plans = [cls.from_dict(item, text) for item in specs]
        ranks = [plan.rank for plan in plans]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: two plans for rank {ranks}; give each rank one plan")
        return plans

    @classmethod
    def from_dict(cls, spec: Any, text: str = "") -> FaultPlan:
        if not isinstance(spec, dict):
            raise ValueError(
                f"vllm-bidkv: {FAULTS_ENV} must be a JSON object or a list of them, got {text!r}"
            )
        for key in spec:
            if key not in cls.KEYS:
                raise ValueError(
                    f"vllm-bidkv: {FAULTS_ENV}: unknown key {key!r}; known: {', '.join(cls.KEYS)}"
                )
        for key in ("load_every", "store_every", "complete_after_steps"):
            value = spec.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: {key}={value!r} must be an integer >= 0")
        blocks = spec.get("load_blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, int) and b >= 0 for b in blocks):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: load_blocks={blocks!r} must be a list of block ids")
        mid_batch = spec.get("mid_batch", False)
        if not isinstance(mid_batch, bool):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: mid_batch={mid_batch!r} must be true or false")
        rank = spec.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: rank={rank!r} must be a worker rank >= 0 or null")
        return cls(
            load_every=spec.get("load_every", 0),
            load_blocks=frozenset(blocks),
            store_every=spec.get("store_every", 0),
            mid_batch=mid_batch,
            rank=rank,
            complete_after_steps=spec.get("complete_after_steps", 0),
        )

    def load_fails(self, job: TransferJob) -> bool:
        self._loads_seen += 1
        fails = bool(
            self.load_every and self._loads_seen % self.load_every == 0
        ) or not self.load_blocks.isdisjoint(job.gpu_block_ids)
        if fails:
            self.injected["load_jobs"] += 1
            self.injected["load_blocks"] += len(job.gpu_block_ids)
        return fails

    def store_fails(self, jobs: list[TransferJob]) -> bool:
        self._stores_seen += 1
        fails = bool(self.store_every and self._stores_seen % self.store_every == 0)
        if fails:
            self.injected["store_jobs"] += len(jobs)
            self.injected["store_blocks"] += sum(len(job.gpu_block_ids) for job in jobs)
        return fails


_faults: list[FaultPlan] = []
_faults_read = False


def set_faults(plan: FaultPlan | list[FaultPlan] | None) -> None:
    """Test hook: replace this process's fault plans (None: no faults). No opt-in needed:
    only code running in this process (a test) can call it."""
    global _faults, _faults_read
    _faults = [] if plan is None else [plan] if isinstance(plan, FaultPlan) else list(plan)
    _faults_read = True


def read_faults_env(environ: Any = None) -> list[FaultPlan]:
    """The plans ``VLLM_BIDKV_FAULTS`` asks for; ValueError if it is set without the opt-in
    ``VLLM_BIDKV_TEST_HOOKS=1`` (a test hook left in a production environment would silently
    turn the cache into recompute) or is malformed."""
    env = os.environ if environ is None else environ
    text = env.get(FAULTS_ENV)
    if not text:
        return []
    if env.get(TEST_HOOKS_ENV) != "1":
        raise ValueError(
            f"vllm-bidkv: {FAULTS_ENV} is set but test hooks are off: it injects copy failures and "
            f"delays, for tests only. Unset {FAULTS_ENV}, or set {TEST_HOOKS_ENV}=1 to run the test hook."
        )
    return FaultPlan.from_json(text)


def active_faults(rank: int = 0) -> FaultPlan | None:
    """The fault plan of the worker of global ``rank`` in this process: ``set_faults``'s, else
    ``VLLM_BIDKV_FAULTS``'s; the plan naming ``rank``, else the one naming no rank, else None."""
    global _faults, _faults_read
    if not _faults_read:
        _faults = read_faults_env()
        _faults_read = True
        if _faults:
            logger.warning(
                "vllm-bidkv: TEST HOOK ACTIVE (%s=%s): copies fail or complete late on purpose",
                FAULTS_ENV,
                os.environ.get(FAULTS_ENV),
            )
    mine = next((plan for plan in _faults if plan.rank == rank), None)
    return mine or next((plan for plan in _faults if plan.rank is None), None)
