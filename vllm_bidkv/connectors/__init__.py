"""BidKVConnector, the only subclass of vLLM's KVConnectorBase_V1 in this package."""

from vllm_bidkv.connectors.bidkv_connector import BidKVConnector

__all__ = ["BidKVConnector"]
