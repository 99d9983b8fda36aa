"""Module paths vLLM's stock ``--kv-offloading-backend lmcache`` imports; they lead to lmcache.adapters.vllm.

vLLM 0.33's ``lmcache_mp_connector`` imports ``lmcache.integration.vllm.utils.mla_enabled`` and
``lmcache.utils.init_logger`` at module load, then prefers
``lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`` when it imports: that class is
``LMCacheConnector`` in mp mode, talking to ``lmcache server`` (default tcp://localhost:5555, or
``lmcache.mp.host``/``lmcache.mp.port`` in kv_connector_extra_config).
"""
