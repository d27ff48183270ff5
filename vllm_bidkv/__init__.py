"""vllm-bidkv: bid-driven preemption and a CPU KV tier for vLLM, as one KV connector.

``import vllm_bidkv`` does not import vLLM; ``vllm_bidkv.BidKVConnector`` does (so
``kv_connector_module_path: "vllm_bidkv"`` works without the plugin).
"""

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "BidKVConnector":  # importlib keeps vLLM out of the pure packages' type check
        return importlib.import_module("vllm_bidkv.connectors").BidKVConnector
    raise AttributeError(f"module 'vllm_bidkv' has no attribute {name!r}")
