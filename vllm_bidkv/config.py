"""BidKVConfig: one validated object from ``kv_connector_extra_config`` + ``BIDKV_*``.

Every key is declared once in ``_FIELDS`` (type, default, allowed values, doc); the
README's config table is generated from it (``vllm-bidkv config --markdown``).
Precedence: defaults < ``kv_connector_extra_config`` < environment (``BIDKV_<KEY>``).
``BIDKV_DISABLE=1`` is shorthand for ``BIDKV_ENABLED=0``. No vLLM import.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

VICTIM_POLICIES = (
    "bidkv",
    "vllm-default",
    "random",
    "largest-first",
    "bidkv-0.1",
    "lcf",
    "reclaim-score",
    "remaining-output",
    "bidkv-0.2",
)
ADMISSIONS = ("fcfs", "sjf", "cache-aware")
OFFLOAD_MODES = ("auto", "lazy", "eager", "off")
CPU_EVICTIONS = ("lru", "bid", "arc")
COPY_BACKENDS = ("auto", "triton", "torch")

logger = logging.getLogger("vllm_bidkv")

# Keys that take a size in bytes.
BYTE_KEYS = ("cpu_bytes", "disk_bytes")
# Size units of ``cpu_bytes`` and ``disk_bytes`` (matched case-insensitively): decimal and binary, up to tera.
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_UNITS = {"": 1, **{unit.lower(): size for unit, size in SIZE_UNITS.items()}}
_SIZE_EXPECTED = (
    "a whole number of bytes, or a number with a unit: "
    + ", ".join(SIZE_UNITS)
    + " (KB..TB are powers of 1000, KiB..TiB powers of 1024), e.g. 512MiB or 1TiB"
)


@dataclasses.dataclass(frozen=True)
class _Field:
    type: type
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


_FIELDS: dict[str, _Field] = {
    "enabled": _Field(
        bool, True, "Master switch. False (or `BIDKV_DISABLE=1`): no patch is applied, vLLM runs stock."
    ),
    "kill_switch": _Field(
        bool, False, "Patches stay applied but act as stock vLLM: vLLM's victim, no offload. For A/B runs."
    ),
    "victim_policy": _Field(str, "bidkv", "Who is preempted when KV memory runs out.", VICTIM_POLICIES),
    "admission": _Field(
        str,
        "fcfs",
        "Order of the waiting queue: vLLM's (`fcfs`), shortest prompt first (`sjf`), or least prefill work left after the GPU prefix-cache and CPU-tier hits first (`cache-aware`, looked up again every step, aged by `admission_max_bypass`).",
        ADMISSIONS,
    ),
    "admission_max_bypass": _Field(
        int,
        32,
        "Aging bound of `cache-aware` admission: a waiting request is overtaken by at most this many later arrivals, then goes first whatever its size. 0: first come, first served.",
        minimum=0,
    ),
    "offload_mode": _Field(
        str,
        "auto",
        "`auto`: store each full block once the forward that computed it is done while the CPU tier has room (a free slot, or an entry unused for four turnovers of the GPU pool), else park it as `lazy` does; `lazy`: park free GPU blocks in the CPU tier just before vLLM reuses them; `eager`: also store a request's blocks when it finishes; `off`: no CPU tier. Every mode but `off` rescues preempted requests' blocks.",
        OFFLOAD_MODES,
    ),
    "cpu_bytes": _Field(
        int,
        4 * 2**30,
        "CPU tier size in bytes (per worker); accepts units `KB` `MB` `GB` `TB` (powers of 1000) and `KiB` `MiB` `GiB` `TiB` (powers of 1024), e.g. `512MiB`, `1TiB`.",
        minimum=1,
    ),
    "disk_path": _Field(
        str,
        "",
        "A directory for a disk tier behind the CPU tier (empty: none). Blocks the CPU tier stores are written there in the background; a hit there is loaded through the CPU tier; it survives a restart with the same model and KV layout (vLLM's prefix hashes must be the same: with a non-cryptographic `prefix_caching_hash_algo`, set `PYTHONHASHSEED`). Needs an `offload_mode` other than `off`.",
    ),
    "disk_bytes": _Field(
        int,
        64 * 2**30,
        "Disk tier size in bytes (per worker), with the units of `cpu_bytes`; the file is sparse, so a disk with less room drops the stores it cannot take.",
        minimum=1,
    ),
    "cpu_eviction": _Field(
        str,
        "lru",
        "CPU tier eviction: `lru`, `bid` (LRU, but keep the blocks of preempted requests until they resume), or `arc` (the adaptive replacement cache of vLLM's own CPU offloading).",
        CPU_EVICTIONS,
    ),
    "copy_backend": _Field(
        str,
        "auto",
        "Block copies: `triton` kernel, batched `torch`, or `auto` (triton on CUDA, torch on CPU).",
        COPY_BACKENDS,
    ),
    "async_load_min_tokens": _Field(
        int,
        8192,
        "A CPU-tier hit of at least this many tokens loads asynchronously: the request waits (`WAITING_FOR_REMOTE_KVS`) while the batch runs on; shorter hits load before the forward that reads them. 0: every load asynchronous (always so under vLLM's async scheduling). An asynchronous load costs its request at least a step of waiting for the report, so it pays only where a synchronous one would stall the batch about as long: 8192 tokens of Llama-3-8B are 1 GiB, ≈ 21 ms at 50 GB/s, a decode step of a full H100 batch (docs/RESULTS.md, asynchronous loads).",
        minimum=0,
    ),
    "lazy_lookahead_steps": _Field(
        float,
        2.0,
        "Lazy offload keeps this many steps' worth of block consumption clean ahead of reuse.",
        minimum=0.5,
    ),
    "seed": _Field(int, 0, "Seed of the `random` victim policy.", minimum=0),
    "bid_recompute_cost": _Field(
        float, 1.0, "δ: cost of recomputing one token (the unit of δ).", minimum=0.0
    ),
    "bid_attention_cost": _Field(
        float,
        3.3e-5,
        "δ: extra recompute cost per token per token of context before it (attention's length term; 4·layers·hidden / 2·params for Llama-3-8B).",
        minimum=0.0,
    ),
    "bid_load_cost": _Field(
        float,
        0.135,
        "δ: cost of loading one token from the CPU tier (H100: 128 KiB at 50 GB/s vs 16 GFLOP at 800 TFLOP/s).",
        minimum=0.0,
    ),
    "bid_progress_weight": _Field(
        float,
        64.0,
        "δ: added per unit of output progress (output/max tokens), so near-finished requests are kept.",
        minimum=0.0,
    ),
    "bid_starvation_weight": _Field(
        float,
        256.0,
        "δ: added per earlier preemption of the same request, so no request is starved.",
        minimum=0.0,
    ),
    "bid_epsilon": _Field(float, 1e-6, "ε in U = r / (δ + ε).", minimum=1e-12),
    "bid_step_cost": _Field(
        float,
        64.0,
        "vLLM waits a step for blocks a store holds instead of preempting only when the victim's δ exceeds this (what a step's wait is worth; 0: whenever a store holds a free block). 64: the best of a sweep over 0-1000 on seven workloads (docs/RESULTS.md).",
        minimum=0.0,
    ),
}

_BOOL_SPELLINGS = (("true", "false"), ("1", "0"), ("yes", "no"), ("on", "off"))
_TRUE = {true for true, _ in _BOOL_SPELLINGS}
_FALSE = {false for _, false in _BOOL_SPELLINGS}


def _bad(key: str, value: object, expected: str) -> ValueError:
    return ValueError(f"vllm-bidkv config: {key}={value!r} is invalid; expected {expected}")


def _coerce(key: str, value: Any) -> Any:
    field = _FIELDS[key]
    if field.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _bad(key, value, "a boolean: " + ", ".join(f"{t}/{f}" for t, f in _BOOL_SPELLINGS))
    if field.type is str and not field.choices:  # a path
        if not isinstance(value, str) or "\0" in value:
            raise _bad(key, value, "a path (a string)")
        return value
    if field.type is str:
        if not isinstance(value, str) or value not in field.choices:
            raise _bad(key, value, "one of " + ", ".join(field.choices))
        return value
    expected = _numeric_expected(key, field)
    if isinstance(value, bool):
        raise _bad(key, value, expected)
    if key in BYTE_KEYS and isinstance(value, str):
        value = _parse_bytes(key, value, expected)
    try:
        number = field.type(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise _bad(key, value, expected) from None
    if field.type is float and not math.isfinite(number):
        raise _bad(key, value, expected)
    too_small = field.minimum is not None and number < field.minimum
    fractional = field.type is int and isinstance(value, float) and value != number
    if too_small or fractional:
        raise _bad(key, value, expected)
    return number


def _numeric_expected(key: str, field: _Field) -> str:
    """What a numeric key accepts, for its error message."""
    if key in BYTE_KEYS:
        return _SIZE_EXPECTED + (f", >= {field.minimum:g} byte" if field.minimum is not None else "")
    kind = "a finite float" if field.type is float else "an integer"
    return kind + (f" >= {field.minimum:g}" if field.minimum is not None else "")


def _parse_bytes(key: str, text: str, expected: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise _bad(key, text, expected)
    size = decimal.Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    if size != size.to_integral_value():
        raise _bad(key, text, expected)
    return int(size)


@dataclasses.dataclass(frozen=True)
class BidKVConfig:
    """Validated settings; build with ``from_sources`` (or directly in tests)."""

    enabled: bool = _FIELDS["enabled"].default
    kill_switch: bool = _FIELDS["kill_switch"].default
    victim_policy: str = _FIELDS["victim_policy"].default
    admission: str = _FIELDS["admission"].default
    admission_max_bypass: int = _FIELDS["admission_max_bypass"].default
    offload_mode: str = _FIELDS["offload_mode"].default
    cpu_bytes: int = _FIELDS["cpu_bytes"].default
    disk_path: str = _FIELDS["disk_path"].default
    disk_bytes: int = _FIELDS["disk_bytes"].default
    cpu_eviction: str = _FIELDS["cpu_eviction"].default
    copy_backend: str = _FIELDS["copy_backend"].default
    async_load_min_tokens: int = _FIELDS["async_load_min_tokens"].default
    lazy_lookahead_steps: float = _FIELDS["lazy_lookahead_steps"].default
    seed: int = _FIELDS["seed"].default
    bid_recompute_cost: float = _FIELDS["bid_recompute_cost"].default
    bid_attention_cost: float = _FIELDS["bid_attention_cost"].default
    bid_load_cost: float = _FIELDS["bid_load_cost"].default
    bid_progress_weight: float = _FIELDS["bid_progress_weight"].default
    bid_starvation_weight: float = _FIELDS["bid_starvation_weight"].default
    bid_epsilon: float = _FIELDS["bid_epsilon"].default
    bid_step_cost: float = _FIELDS["bid_step_cost"].default

    def __post_init__(self) -> None:
        for key in _FIELDS:
            object.__setattr__(self, key, _coerce(key, getattr(self, key)))
        if self.disk_path and self.offload_mode == "off":
            raise _bad(
                "disk_path",
                self.disk_path,
                "'' while offload_mode='off' (the disk tier sits behind the CPU tier)",
            )

    @property
    def active(self) -> bool:
        """True when the plugin changes anything at all."""
        return self.enabled and not self.kill_switch

    @property
    def offload_enabled(self) -> bool:
        return self.active and self.offload_mode != "off"

    @classmethod
    def from_sources(
        cls, extra_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> BidKVConfig:
        """Merge ``kv_connector_extra_config`` and ``BIDKV_*`` env vars (env wins).

        Unknown config keys raise (a typo silently running the default is the worst
        outcome). Unknown ``BIDKV_*`` variables only warn: the bidkv package on PyPI
        uses the same prefix (``BIDKV_STRATEGY``...) and must not break us.
        """
        values: dict[str, Any] = {}
        for key, value in (extra_config or {}).items():
            if key not in _FIELDS:
                raise ValueError(
                    f"vllm-bidkv config: unknown key {key!r} in kv_connector_extra_config; "
                    f"known keys: {', '.join(_FIELDS)}"
                )
            values[key] = value
        env = os.environ if environ is None else environ
        for name, value in env.items():
            if not name.startswith("BIDKV_"):
                continue
            if name == "BIDKV_DISABLE":
                if _coerce("enabled", value):
                    values["enabled"] = False
                continue
            key = name[len("BIDKV_") :].lower()
            if key not in _FIELDS:
                logger.warning("vllm-bidkv: ignoring unknown environment variable %s", name)
                continue
            values[key] = value
        return cls(**values)


def markdown_table() -> str:
    """The README's config table."""
    rows = ["| key | env | default | values | meaning |", "|---|---|---|---|---|"]
    for key, field in _FIELDS.items():
        values = ", ".join(f"`{c}`" for c in field.choices) if field.choices else field.type.__name__
        if field.type is float:
            values = "finite " + values
        if field.type is str and not field.choices:
            values = "path"
        if field.minimum is not None:
            values += f" ≥ {field.minimum:g}"
        default = f"{field.default / 2**30:g}GiB" if key in BYTE_KEYS else field.default
        rows.append(f"| `{key}` | `BIDKV_{key.upper()}` | `{default}` | {values} | {field.doc} |")
    return "\n".join(rows)
