"""``mla_enabled``, imported by vLLM's stock lmcache_mp_connector module."""

from __future__ import annotations

from typing import Any


def mla_enabled(model_config: Any) -> bool:
    return isinstance(getattr(model_config, "use_mla", None), bool) and model_config.use_mla
