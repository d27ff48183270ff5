"""The only code that touches vLLM internals.

``apply()`` installs the runtime patches (today: the Scheduler bind hook; the
victim hook and admission queue are per-instance, see ``hooks``), ``revert()``
removes them, ``applied()`` lists what is in place. All are idempotent. With
``BIDKV_DISABLE=1`` / ``enabled: false`` nothing is applied and vLLM is stock.
On a vLLM built with the source patch (top-level ``patches/``) nothing is
applied either: vLLM binds the connector and asks it for victims itself.
"""

from __future__ import annotations

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.patches.capabilities import Capabilities, UnsupportedVLLMError, probe, require_supported


def apply(config: BidKVConfig | None = None) -> list[str]:
    """Install the patches unless disabled; returns the names now applied."""
    config = config or BidKVConfig.from_sources()
    if not config.enabled:
        return []
    if require_supported().vllm_binds_context:
        # A vLLM carrying patches/vllm-*-scheduler-context.patch binds the connector itself.
        return []
    from vllm_bidkv.patches import hooks

    hooks.install_bind_hook()
    return applied()


def revert() -> list[str]:
    """Remove every class-level patch; returns the names removed."""
    from vllm_bidkv.patches import hooks

    return ["scheduler_bind_hook"] if hooks.remove_bind_hook() else []


def applied() -> list[str]:
    from vllm_bidkv.patches import hooks

    return ["scheduler_bind_hook"] if hooks.bind_hook_installed() else []


__all__ = ["Capabilities", "UnsupportedVLLMError", "applied", "apply", "probe", "require_supported", "revert"]
