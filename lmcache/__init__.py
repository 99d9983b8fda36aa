"""lmcache: an engine-agnostic KV-cache layer for LLM serving."""

__version__ = "0.1.0"
