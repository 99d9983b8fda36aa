"""Compatibility names for vLLM's stock ``--kv-offloading-backend lmcache`` flag (see vllm/)."""
