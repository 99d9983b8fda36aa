"""Shared set-up for tier tests: an engine over a tiny geometry, and deterministic prompts/KV."""

from __future__ import annotations

import torch
from kvutil import same_tokens, sglang_layout, slots_for, vllm_layout

from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KVGeometry, ModelIdentity

GEO = KVGeometry(2, 2, 8, 8, torch.bfloat16)
CHUNK = 16
CHUNK_BYTES = GEO.bytes_per_token() * CHUNK


def engine(chunks_in_cpu: float = 256, **over) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "max_cpu_size_gb": chunks_in_cpu * CHUNK_BYTES / 2**30,
                                         **over})
    return CacheEngine(cfg, ModelIdentity("tier-test", GEO), device="cpu")


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def source(seed: int = 1):
    """Engine KV memory with known bits: 64 blocks of 16 slots, vLLM layout."""
    return vllm_layout("LBNHC", GEO, 64, 16, seed=seed)


def store(e: CacheEngine, tokens: list[int], seed: int = 1):
    kv = source(seed)
    slots = slots_for(len(tokens), 1024, 16, True, seed)
    e.store(tokens, kv, slots)
    return kv, slots


def retrieved_exactly(e: CacheEngine, tokens: list[int], kv, slots) -> int:
    """Retrieve into a fresh SGLang-layout pool and check every loaded byte; returns tokens loaded."""
    dst = sglang_layout(GEO, 2048, seed=99)
    dst_slots = slots_for(len(tokens), 2048, 1, False, 7)
    got = e.retrieve(tokens, dst, dst_slots)
    assert same_tokens(kv, slots[:got], dst, dst_slots[:got], GEO.num_layers)
    return got
