"""Named run configurations shared by the simulator and the real-engine runner.

A config is what changes between runs of one benchmark: which KV connector is loaded
(none, BidKVConnector, or one of vLLM's own offloading connectors), its victim strategy
and offload mode, and the GPU / CPU memory it gets. Admission is *not* part of a config:
the runner applies one admission to every config (bidkv 0.1.0's comparison mixed
admission with victim choice; ours keeps them apart). Under ``sjf`` even ``stock`` needs
the connector (vLLM has no SJF), so it runs BidKVConnector with vLLM's own victim and no
offload; vLLM's peers have no SJF, so they refuse ``sjf``.

Kinds of config:

* ``stock``: vLLM without a connector.
* ``kill-switch``: BidKVConnector with ``kill_switch``: every patch applied, nothing done
  (vLLM's victim, no offload). Against ``stock`` it isolates the cost of vLLM's own
  connector path and of our patches.
* BidKV: a victim strategy (``vllm_bidkv.policy.STRATEGIES``) with offload ``off`` (victim
  rule alone), ``auto`` (the default), ``lazy`` or ``eager``. Names: the strategy (``lcf``),
  ``+offload`` for the default ``auto`` (``lcf+offload``), ``-lazy`` / ``-eager`` after it for
  the others; ``offload`` is vLLM's own victim with our tier. A CPU-tier hit of
  ``async_load_min_tokens`` (8192) tokens or more loads asynchronously (the request waits
  while the batch runs on); ``bidkv+offload-sync`` loads every hit synchronously, before the
  forward that reads it, so that against ``bidkv+offload`` it shows what asynchronous loads
  change; ``bidkv+offload-wait`` waits for a store's blocks whenever one holds them (vLLM's
  rule, ``bid_step_cost`` 0) where ours preempts a cheap victim instead.
  ``bidkv+offload-late2`` (real engine only) runs ``bidkv+offload`` with every copy reported
  two steps late (the ``complete_after_steps`` test hook), as CUDA would: against
  ``bidkv+offload`` it shows what late completions cost on the engine.
* Peers, run through their **own** scheduler-side code from the installed vLLM (the
  simulator plays their worker): ``vllm-offloading`` (``OffloadingConnector`` with its CPU
  manager, ``eviction_policy`` LRU; ``vllm-offloading-arc``: ARC) and
  ``vllm-simple-offload`` (``SimpleCPUOffloadConnector``, eager; ``-lazy``: its lazy mode).
  Each gets the preset's ``cpu_bytes``, the same CPU memory as ours. vLLM's victim rule.
  On the real engine the peer runs whole, worker included; where vLLM's own worker refuses
  the platform (``OffloadingConnector``'s CPU spec builds its worker on CUDA-alike and XPU
  only), ``vllm-offloading*`` run with ``vllm_bidkv_bench.peer_spec``: vLLM's
  ``CPUOffloadingSpec`` with a CPU copy handler of ours in its worker (``CPU_COPY_PEERS``).
* ``oracle``: the bound for any policy with this memory (simulator only) — the preset's GPU
  blocks and CPU bytes, copies that take no time, every computed block offered to the tier at
  compute time and again when the GPU drops it, and Belady eviction with bypass of a tier
  that counts nothing the GPU holds (two levels): it knows every request of the trace ahead
  (``vllm_bidkv_bench.oracle``). Records carry ``distance_to_oracle``.
* ``ideal-tier``: a reference, "unlimited CPU memory" — BidKV's ``bidkv`` victim
  rule and tier (``auto``), but a tier without a size limit (``cpu_bytes`` large enough to hold
  every block the run can produce: nothing is ever evicted) and host↔device copies that
  take no time (the simulator prices them at 0); the connector's own CPU time never enters
  the virtual clock of any config. It keeps the ``bidkv`` victim so that bidkv+offload's
  distance to it is exactly what its finite tier and real copies cost (the issue: "the limit
  for *our* design is the same GPU memory with a perfect tier"); another config's distance
  also contains its victim rule's difference, and may be < 1 where that rule is better.
* ``unbounded``: **more GPU memory** (every running request fits at full length: nothing is
  preempted). Not a bound for a preemption or offload policy; kept for continuity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    name: str
    victim_policy: str | None = None
    """None: no connector (stock vLLM)."""
    offload_mode: str = "off"
    unbounded: bool = False
    """More GPU memory: enough KV blocks that nothing is ever preempted (not a policy bound)."""
    connector: str = "bidkv"
    """``bidkv``, or a peer: ``offloading`` (vLLM's OffloadingConnector), ``simple-offload``
    (vLLM's SimpleCPUOffloadConnector)."""
    connector_options: tuple[tuple[str, Any], ...] = ()
    """More ``kv_connector_extra_config`` keys: a peer's own (beside ``cpu_bytes_to_use``), or
    BidKVConnector's beyond those the fields above set."""
    ideal: bool = False
    """``ideal-tier``: CPU tier without a size limit, copies that take no time."""
    label: str = ""
    """How reports describe the config (empty: nothing to add)."""
    kill_switch: bool = False
    """BidKVConnector loaded and patched in, but inert (``kill_switch``): vLLM's connector path alone."""
    oracle: bool = False
    """``oracle`` (simulator only): free copies, every block offered to the tier, Belady eviction
    (``vllm_bidkv_bench.oracle``)."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment of the engine process (the real engine only): a test hook such as
    ``VLLM_BIDKV_FAULTS``, e.g. completions held back as CUDA events would hold them."""

    @property
    def is_peer(self) -> bool:
        return self.connector in PEER_CONNECTORS

    def engine_label(self, cpu_copy_peer: bool) -> str:
        """``label`` as the real engine runs the config: says so when our CPU copy handler
        stands in for a peer's worker (``kv_transfer_config(cpu_copy_peer=True)``)."""
        if not (cpu_copy_peer and self.connector in CPU_COPY_PEERS):
            return self.label
        vllm_name, ours = f"vLLM {PEER_CONNECTORS[self.connector]}", CPU_COPY_PEERS[self.connector][1]
        return self.label.replace(vllm_name, ours, 1) if vllm_name in self.label else f"{ours}; {self.label}"

    def connector_extra(self, admission: str, cpu_bytes: int) -> dict[str, Any] | None:
        """``kv_connector_extra_config``, or None when the run is stock vLLM without the connector."""
        if self.is_peer:
            if admission != "fcfs":
                raise ValueError(
                    f"config {self.name}: vLLM's {PEER_CONNECTORS[self.connector]} has no {admission} admission"
                )
            return {"cpu_bytes_to_use": cpu_bytes, **dict(self.connector_options)}
        if self.victim_policy is None and admission == "fcfs":
            return None
        extra: dict[str, Any] = {
            "victim_policy": self.victim_policy or "vllm-default",
            "offload_mode": self.offload_mode,
            "admission": admission,
        }
        if self.offload_mode != "off":
            extra["cpu_bytes"] = cpu_bytes
        if self.kill_switch:
            extra["kill_switch"] = True
        return {**extra, **dict(self.connector_options)}

    def kv_transfer_config(
        self, admission: str, cpu_bytes: int, *, cpu_copy_peer: bool = False
    ) -> dict[str, Any] | None:
        """vLLM's ``kv_transfer_config``, or None for stock vLLM. ``cpu_copy_peer`` (the real
        engine on a platform vLLM's own offloading worker refuses, e.g. vLLM on CPU): a peer
        in ``CPU_COPY_PEERS`` gets the spec keys that swap in our CPU copy handler."""
        extra = self.connector_extra(admission, cpu_bytes)
        if extra is None:
            return None
        if self.is_peer:
            if cpu_copy_peer and self.connector in CPU_COPY_PEERS:
                extra = {**extra, **CPU_COPY_PEERS[self.connector][0]}
            return {
                "kv_connector": PEER_CONNECTORS[self.connector],
                "kv_role": "kv_both",
                "kv_connector_extra_config": extra,
            }
        return {
            "kv_connector": "BidKVConnector",
            "kv_connector_module_path": "vllm_bidkv",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        }


PEER_CONNECTORS = {"offloading": "OffloadingConnector", "simple-offload": "SimpleCPUOffloadConnector"}

# Peers whose worker the real engine swaps for a CPU copy handler of ours where vLLM's own
# refuses the platform: the ``kv_connector_extra_config`` keys that select it (vLLM's
# ``OffloadingSpecFactory``: ``spec_name`` / ``spec_module_path``), and how reports name
# the result. ``vllm_bidkv_bench.peer_spec`` holds the spec (vLLM's CPUOffloadingSpec, our
# worker); it is named here, not imported, so that configs need no vLLM.
CPU_COPY_PEERS: dict[str, tuple[dict[str, str], str]] = {
    "offloading": (
        {"spec_name": "CPUCopyOffloadingSpec", "spec_module_path": "vllm_bidkv_bench.peer_spec"},
        "vLLM OffloadingConnector with a CPU copy handler of ours",
    ),
}

# Victim rules added by issue 14 (``vllm_bidkv.policy.STRATEGIES``): each alone and with the tier.
NEW_VICTIM_RULES = ("lcf", "reclaim-score", "remaining-output", "bidkv-0.2")

CONFIGS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        RunConfig("stock"),
        RunConfig("unbounded", unbounded=True, label="more GPU memory (nothing preempted), not a bound"),
        RunConfig("vllm-default", "vllm-default"),
        RunConfig("kill-switch", "vllm-default", kill_switch=True, label="BidKVConnector loaded, inert"),
        RunConfig("random", "random"),
        RunConfig("largest-first", "largest-first"),
        RunConfig("bidkv-0.1", "bidkv-0.1"),
        RunConfig("bidkv", "bidkv"),
        RunConfig("offload", "vllm-default", "auto"),
        RunConfig("offload-eager", "vllm-default", "eager"),
        RunConfig("bidkv+offload", "bidkv", "auto"),
        RunConfig("bidkv+offload-lazy", "bidkv", "lazy"),
        *(
            RunConfig(
                f"bidkv+offload-{eviction}",
                "bidkv",
                "auto",
                connector_options=(("cpu_eviction", eviction),),
                label=f"bidkv+offload, tier eviction {eviction}",
            )
            for eviction in ("bid", "arc")
        ),
        RunConfig("bidkv+offload-eager", "bidkv", "eager"),
        RunConfig(
            "bidkv+offload-sync",
            "bidkv",
            "auto",
            # No hit reaches it: every load runs before the forward that reads it.
            connector_options=(("async_load_min_tokens", 2**31),),
            label="bidkv+offload, every load synchronous",
        ),
        RunConfig(
            "bidkv+offload-wait",
            "bidkv",
            "auto",
            # vLLM's own rule: wait whenever a store holds a free block, whatever the victim costs.
            connector_options=(("bid_step_cost", 0.0),),
            label="bidkv+offload, vLLM's wait rule (bid_step_cost 0)",
        ),
        RunConfig(
            "bidkv+offload-late2",
            "bidkv",
            "auto",
            env=(("VLLM_BIDKV_FAULTS", '{"complete_after_steps": 2}'), ("VLLM_BIDKV_TEST_HOOKS", "1")),
            label="bidkv+offload, every copy reported 2 steps late (test hook; real engine only)",
        ),
        *(RunConfig(rule, rule) for rule in NEW_VICTIM_RULES),
        *(RunConfig(f"{rule}+offload", rule, "auto") for rule in NEW_VICTIM_RULES),
        RunConfig("bidkv-0.1+offload", "bidkv-0.1", "auto"),
        RunConfig(
            "vllm-offloading",
            connector="offloading",
            connector_options=(("eviction_policy", "lru"),),
            label="vLLM OffloadingConnector, CPU manager, LRU",
        ),
        RunConfig(
            "vllm-offloading-arc",
            connector="offloading",
            connector_options=(("eviction_policy", "arc"),),
            label="vLLM OffloadingConnector, CPU manager, ARC",
        ),
        RunConfig(
            "vllm-simple-offload",
            connector="simple-offload",
            connector_options=(("lazy_offload", False),),
            label="vLLM SimpleCPUOffloadConnector, eager",
        ),
        RunConfig(
            "vllm-simple-offload-lazy",
            connector="simple-offload",
            connector_options=(("lazy_offload", True),),
            label="vLLM SimpleCPUOffloadConnector, lazy",
        ),
        RunConfig(
            "ideal-tier",
            "bidkv",
            "auto",
            ideal=True,
            # A free copy stalls nothing: loading it before the forward costs no step of waiting.
            connector_options=(("async_load_min_tokens", 2**31),),
            label="reference: same GPU blocks, unlimited CPU tier, free copies (bidkv victim)",
        ),
        RunConfig(
            "oracle",
            "bidkv",
            "auto",
            oracle=True,
            connector_options=(("async_load_min_tokens", 2**31),),
            label="bound: same GPU blocks and CPU bytes, free copies, every block offered, two-level Belady",
        ),
    )
}


def parse_configs(names: str | list[str], *, with_unbounded: bool = True) -> list[RunConfig]:
    """Configs by name (comma-separated or a list); ``unbounded`` last, unless ``with_unbounded`` is off."""
    items = names.split(",") if isinstance(names, str) else names
    out = []
    for name in (n.strip() for n in items):
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        if name != "unbounded" and CONFIGS[name] not in out:
            out.append(CONFIGS[name])
    return [*out, CONFIGS["unbounded"]] if with_unbounded else out


def needs_connector(configs: list[RunConfig], admission: str) -> bool:
    return any(c.connector_extra(admission, 1) is not None for c in configs)
