"""``vllm.general_plugins`` entry point ``vllm_bidkv``.

vLLM calls ``register()`` in every process it starts (engine core, workers,
API server) before building a Scheduler. It registers the connector name and
applies the runtime patches unless disabled (``BIDKV_DISABLE=1`` or
``BIDKV_ENABLED=0``; the connector's own ``enabled: false`` is honoured by the
connector itself, since extra config is only known once vLLM builds it).

``register()`` never raises: vLLM's plugin loader calls every plugin without a
try, so an exception here would stop ``vllm serve`` of any model, with the
connector or without. A bad ``BIDKV_*`` value, a vLLM lacking a capability or
anything else that goes wrong is logged in one line and no patch is applied; the
connector name is still registered, so a process that configures the connector
gets the connector's own refusal (the same message) instead of vLLM's "unknown
connector".
"""

from __future__ import annotations

import logging

from vllm_bidkv.config import BidKVConfig

logger = logging.getLogger("vllm_bidkv")

CONNECTOR_NAME = "BidKVConnector"


def register() -> None:
    problem: Exception | None = None
    try:
        config: BidKVConfig | None = BidKVConfig.from_sources()
    except ValueError as err:
        config, problem = None, err
    if config is not None and not config.enabled:
        logger.info("vllm-bidkv: disabled by environment; vLLM runs stock")
        return
    try:
        _register_connector()
        if config is not None:
            from vllm_bidkv import patches

            patches.apply(config)
    except Exception as err:  # noqa: BLE001 - see the module doc: log, never raise
        problem = problem or err
    if problem is not None:
        logger.error(
            "%s -- vllm-bidkv applied no patch in this process; BidKVConnector, if configured, refuses to start",
            _one_line(problem),
        )


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "vllm_bidkv.connectors", CONNECTOR_NAME)


def _one_line(err: Exception) -> str:
    """Our own errors (a config value, an unsupported vLLM) already name what is wrong; others
    also need their type to be understood."""
    from vllm_bidkv.patches.capabilities import UnsupportedVLLMError

    text = str(err) if isinstance(err, ValueError | UnsupportedVLLMError) else f"{type(err).__name__}: {err}"
    if not text.startswith("vllm-bidkv"):
        text = f"vllm-bidkv: {text}"
    return " ".join(text.split())
