"""``vllm.general_plugins`` entry point ``vllm_bidkv``.

vLLM calls ``register()`` in every process it starts (engine core, workers,
API server) before building a Scheduler. It registers the connector name and
applies the runtime patches unless disabled (``BIDKV_DISABLE=1`` or
``BIDKV_ENABLED=0``; the connector's own ``enabled: false`` is honoured by the
connector itself, since extra config is only known once vLLM builds it).
"""

from __future__ import annotations

import logging

from vllm_bidkv.config import BidKVConfig

logger = logging.getLogger("vllm_bidkv")

CONNECTOR_NAME = "BidKVConnector"


def register() -> None:
    config = BidKVConfig.from_sources()
    if not config.enabled:
        logger.info("vllm-bidkv: disabled by environment; vLLM runs stock")
        return
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_bidkv import patches

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "vllm_bidkv.connectors", CONNECTOR_NAME)
    patches.apply(config)
