"""One cache engine per process, model, head shard and device, shared by whoever asks.

An engine's scheduler-side and worker-side halves (vLLM creates one connector object for each) often
live in one process; they must see one pool, not two. Adapters get their engine here.
"""

from __future__ import annotations

import threading

import torch

from lmcache.core.config import LMCacheConfig
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import ModelIdentity

_lock = threading.Lock()
_engines: dict[tuple[object, ...], CacheEngine] = {}


def _key(config: LMCacheConfig, identity: ModelIdentity, head_range: tuple[int, int]) -> tuple[object, ...]:
    return (config, identity, tuple(head_range))


def get_engine(config: LMCacheConfig, identity: ModelIdentity, head_range: tuple[int, int],
               device: str | torch.device) -> CacheEngine:
    """The process's engine for this model shard, created on first use."""
    with _lock:
        key = _key(config, identity, head_range)
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = CacheEngine(config, identity, device=device, head_range=head_range)
        return engine


def find_engine(config: LMCacheConfig, identity: ModelIdentity, head_range: tuple[int, int]) -> CacheEngine | None:
    """The engine some other part of this process created, if any (no side effects)."""
    with _lock:
        return _engines.get(_key(config, identity, head_range))


def release(engine: CacheEngine) -> None:
    """Forget and close one engine (its owner is shutting down); a later get_engine makes a new one."""
    with _lock:
        for key in [k for k, e in _engines.items() if e is engine]:
            del _engines[key]
    engine.close()


def close_all() -> None:
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
