"""SGLang adapter: ``LMCacheHiCacheStorage``, a HiCache storage backend, and its launch flags.

Importing this package does not import SGLang; ``lmcache.adapters.sglang.backend`` does (SGLang's
``dynamic`` backend loader imports it by module path).
"""

from __future__ import annotations

import pluggy

from lmcache.core.hookspecs import EngineAdapterSpec, InterfaceSpec

hookimpl = pluggy.HookimplMarker("lmcache")
SUPPORTED_VERSIONS = "==0.5.23"


@hookimpl
def lmcache_engine_adapters() -> list[EngineAdapterSpec]:
    from lmcache.adapters.sglang.flags import launch_lines

    return [EngineAdapterSpec(
        name="sglang",
        engine_package="sglang",
        doc="HiCache storage backend for SGLang 0.5.23 (zero-copy v1 and legacy paths), in-process or mp",
        launch_flags=launch_lines,
        interfaces=(InterfaceSpec("sglang.srt.mem_cache.hicache_storage:HiCacheStorage",
                                  "lmcache.adapters.sglang.backend:LMCacheHiCacheStorage"),),
        supported_versions=SUPPORTED_VERSIONS,
    )]
