"""Named run configurations shared by the simulator and the real-engine runner.

A config is what changes between runs of one benchmark: whether BidKVConnector is
loaded, its victim strategy and offload mode, and whether the GPU KV pool is
unbounded. Admission is *not* part of a config: the runner applies one admission to
every config (bidkv 0.1.0's comparison mixed admission with victim choice; ours keeps
them apart). Under ``sjf`` even ``stock`` needs the connector (vLLM has no SJF), so it
runs BidKVConnector with vLLM's own victim and no offload.
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
    """Enough GPU KV blocks that nothing is ever preempted: the bound every config is compared to."""

    def connector_extra(self, admission: str, cpu_bytes: int) -> dict[str, Any] | None:
        """``kv_connector_extra_config``, or None when the run is stock vLLM without the connector."""
        if self.victim_policy is None and admission == "fcfs":
            return None
        extra: dict[str, Any] = {
            "victim_policy": self.victim_policy or "vllm-default",
            "offload_mode": self.offload_mode,
            "admission": admission,
        }
        if self.offload_mode != "off":
            extra["cpu_bytes"] = cpu_bytes
        return extra

    def kv_transfer_config(self, admission: str, cpu_bytes: int) -> dict[str, Any] | None:
        extra = self.connector_extra(admission, cpu_bytes)
        if extra is None:
            return None
        return {
            "kv_connector": "BidKVConnector",
            "kv_connector_module_path": "vllm_bidkv",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        }


CONFIGS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        RunConfig("stock"),
        RunConfig("unbounded", unbounded=True),
        RunConfig("vllm-default", "vllm-default"),
        RunConfig("random", "random"),
        RunConfig("largest-first", "largest-first"),
        RunConfig("bidkv-0.1", "bidkv-0.1"),
        RunConfig("bidkv", "bidkv"),
        RunConfig("offload", "vllm-default", "lazy"),
        RunConfig("offload-eager", "vllm-default", "eager"),
        RunConfig("bidkv+offload", "bidkv", "lazy"),
        RunConfig("bidkv+offload-eager", "bidkv", "eager"),
    )
}


def parse_configs(names: str | list[str]) -> list[RunConfig]:
    """Configs by name (comma-separated or a list); ``unbounded`` is always included, last."""
    items = names.split(",") if isinstance(names, str) else names
    out = []
    for name in (n.strip() for n in items):
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        if name != "unbounded" and CONFIGS[name] not in out:
            out.append(CONFIGS[name])
    return [*out, CONFIGS["unbounded"]]


def needs_connector(configs: list[RunConfig], admission: str) -> bool:
    return any(c.connector_extra(admission, 1) is not None for c in configs)
