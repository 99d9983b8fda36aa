"""Pieces every engine's launch lines share."""

from __future__ import annotations

import shlex

from lmcache.core.config import LMCacheConfig


def server_line(config: LMCacheConfig, config_path: str | None = None) -> tuple[str, str]:
    """The ``lmcache server`` an engine in mp mode needs running first."""
    server = ["lmcache", "server", "--port", config.server_url.rsplit(":", 1)[-1], "--chunk-size", str(config.chunk_size)]
    if config_path:
        server += ["--config", str(config_path)]
    return "start the cache server first (mp mode)", shlex.join(server)
