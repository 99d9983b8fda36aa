"""Import-compatibility names for vLLM's stock lmcache connector module (see lmcache.integration)."""
