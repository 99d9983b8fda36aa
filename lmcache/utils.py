"""Names vLLM's stock ``--kv-offloading-backend lmcache`` path imports from a package called lmcache."""

from __future__ import annotations

import logging


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
