"""``LMCacheMPConnector``: what vLLM's ``--kv-offloading-backend lmcache`` loads from this package.

The same connector as ``lmcache.adapters.vllm.LMCacheConnector``, always in mp mode (the cache lives in
a separately started ``lmcache server``; vLLM's ``--kv-offloading-size`` is ignored, as vLLM documents).
"""

from __future__ import annotations

from lmcache.adapters.vllm.connector import LMCacheConnector


class LMCacheMPConnector(LMCacheConnector):
    forced_mode = "mp"
