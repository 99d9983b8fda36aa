"""Names vLLM's stock lmcache_mp_connector module imports at load time (for its built-in fallback class).

vLLM uses ``lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`` from this package instead
of that fallback, so these are never instantiated; if something does, it gets a clear error.
"""

from __future__ import annotations

import enum


class _NotProvided:
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError(f"{type(self).__name__} belongs to another lmcache project's vLLM integration; this "
                           "lmcache serves vLLM through lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector")


class LMCacheMPSchedulerAdapter(_NotProvided):
    pass


class LMCacheMPWorkerAdapter(_NotProvided):
    pass


class LoadStoreOp(_NotProvided):
    pass


class ParallelStrategy(enum.Enum):
    NONE = 0
