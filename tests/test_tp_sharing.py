"""Engines of different tensor-parallel sizes share chunks: every store-TP x load-TP pair over 8 KV heads,
through a shared disk directory, a real Redis and a real ``lmcache server``, bit-exact per head."""

from __future__ import annotations

import itertools

import pytest
import torch
from kvutil import random_bits
from serverutil import ServerProcess

from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KIND_MLA, KVGeometry, ModelIdentity
from lmcache.core.layouts import TokenSlotKV

GEO = KVGeometry(2, 8, 8, 8, torch.bfloat16)
CHUNK = 16
TOKENS = 48  # three chunks
TP_SIZES = (1, 2, 4, 8)
PAIRS = list(itertools.product(TP_SIZES, TP_SIZES))


def ranges(tp: int, total: int = GEO.num_kv_heads) -> list[tuple[int, int]]:
    per = total // tp
    return [(r * per, (r + 1) * per) for r in range(tp)]


def truth(geometry: KVGeometry = GEO, seed: int = 5) -> TokenSlotKV:
    """The whole model's KV for the prompt, token i at slot i: every rank's bytes come from here."""
    k = [random_bits(torch.empty(TOKENS, geometry.num_kv_heads, geometry.k_dim, dtype=geometry.dtype), seed + l)
         for l in range(geometry.num_layers)]
    v = [random_bits(torch.empty(TOKENS, geometry.num_kv_heads, geometry.v_dim, dtype=geometry.dtype), seed + 50 + l)
         for l in range(geometry.num_layers)]
    return TokenSlotKV(k, v, 0)


def shard(full: TokenSlotKV, h0: int, h1: int) -> TokenSlotKV:
    assert full.v is not None
    return TokenSlotKV([t[:, h0:h1].contiguous() for t in full.k], [t[:, h0:h1].contiguous() for t in full.v], h0)


def blank(h0: int, h1: int) -> TokenSlotKV:
    k = [torch.zeros(TOKENS, h1 - h0, GEO.k_dim, dtype=GEO.dtype) for _ in range(GEO.num_layers)]
    v = [torch.zeros(TOKENS, h1 - h0, GEO.v_dim, dtype=GEO.dtype) for _ in range(GEO.num_layers)]
    return TokenSlotKV(k, v, h0)


def engine(head_range: tuple[int, int], model: str, **over) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "max_cpu_size_gb": 0.01, **over})
    return CacheEngine(cfg, ModelIdentity(model, GEO), device="cpu", head_range=head_range)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def share(store_tp: int, load_tp: int, model: str, **over) -> None:
    """TP=store_tp stores the prompt (each rank its shard), TP=load_tp engines (fresh processes' view: empty
    CPU tiers) look it up and load it; every loaded byte must be the truth's for that rank's heads."""
    full, toks, slots = truth(), list(range(1000, 1000 + TOKENS)), torch.arange(TOKENS)
    writers = [engine(r, model, **over) for r in ranges(store_tp)]
    for w in writers:
        assert w.store(toks, shard(full, *w.head_range), slots).stored_chunks == TOKENS // CHUNK
        w.flush()
    if over.get("mode") != "mp":  # in-process: the readers are other engines, sharing only the lower tiers
        for w in writers:
            w.close()
    readers = [engine(r, model, **over) for r in ranges(load_tp)]
    try:
        for r in readers:
            keys = r.hasher().keys(toks)
            assert r.lookup(toks) == TOKENS, f"TP={load_tp} rank {r.head_range} misses what TP={store_tp} stored"
            assert r.lookup_chunks(keys, ranges(load_tp)) == TOKENS // CHUNK  # the scheduler's question for all ranks
            dst = blank(*r.head_range)
            assert r.retrieve(toks, dst, slots) == TOKENS
            h0, h1 = r.head_range
            assert dst.v is not None and full.v is not None
            for l in range(GEO.num_layers):
                assert same_bits(dst.k[l], full.k[l][:, h0:h1]) and same_bits(dst.v[l], full.v[l][:, h0:h1])
            # a second load is served by what the first one assembled (promoted), with the same bytes
            dst2 = blank(*r.head_range)
            assert r.retrieve(toks, dst2, slots) == TOKENS and all(
                same_bits(a, b) for a, b in zip(dst2.k + dst2.v, dst.k + dst.v))
    finally:
        for e in readers + (writers if over.get("mode") == "mp" else []):
            e.close()


@pytest.mark.parametrize("store_tp,load_tp", PAIRS)
def test_tp_sizes_share_through_a_shared_disk_directory(tmp_path, store_tp, load_tp):
    share(store_tp, load_tp, f"disk-{store_tp}-{load_tp}", local_disk_path=str(tmp_path / "disk"))


@pytest.mark.parametrize("store_tp,load_tp", PAIRS)
def test_tp_sizes_share_through_redis(redis_server, store_tp, load_tp):
    share(store_tp, load_tp, f"redis-{store_tp}-{load_tp}", remote_url=redis_server.url)


@pytest.fixture(scope="module")
def tp_server():
    s = ServerProcess().start()
    yield s
    s.stop()


@pytest.mark.parametrize("store_tp,load_tp", PAIRS)
def test_tp_sizes_share_through_the_server(tp_server, store_tp, load_tp):
    share(store_tp, load_tp, f"mp-{store_tp}-{load_tp}", mode="mp", server_url=tp_server.url, remote_timeout_s=5.0)


def test_a_corrupt_shard_is_a_miss_never_wrong_bytes(tmp_path):
    """TP=2 stored two shards; one is damaged on disk: TP=1 must miss that chunk, not load half of it."""
    disk = str(tmp_path / "disk")
    full, toks, slots = truth(), list(range(1000, 1000 + TOKENS)), torch.arange(TOKENS)
    for r in ranges(2):
        w = engine(r, "corrupt", local_disk_path=disk)
        w.store(toks, shard(full, *r), slots)
        w.flush()
        w.close()
    reader = engine((0, 8), "corrupt", local_disk_path=disk)
    [victim] = (tmp_path / "disk").rglob(f"{reader.hasher().keys(toks)[1].hex()}@4-8.lmc")
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in heads 4-7 of chunk 1
    victim.write_bytes(bytes(data))
    dst = blank(0, 8)
    assert reader.retrieve(toks, dst, slots) == CHUNK  # chunk 0 only: chunk 1's shard failed its checksum
    assert full.v is not None and dst.v is not None
    for l in range(GEO.num_layers):
        assert same_bits(dst.k[l][:CHUNK], full.k[l][:CHUNK]) and same_bits(dst.v[l][:CHUNK], full.v[l][:CHUNK])
    assert reader.stack.disk.stats.corrupt == 1
    reader.close()


def test_mla_replicated_heads_are_unaffected(tmp_path):
    """MLA holds one latent head replicated on every rank: every TP size stores and reads [0, 1)."""
    mla = KVGeometry(2, 1, 12, 0, torch.bfloat16, KIND_MLA)
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "max_cpu_size_gb": 0.01, "local_disk_path": str(tmp_path)})
    toks, slots = list(range(TOKENS)), torch.arange(TOKENS)
    src = TokenSlotKV([random_bits(torch.empty(TOKENS, 1, 12, dtype=mla.dtype), l) for l in range(2)], None, 0)
    w = CacheEngine(cfg, ModelIdentity("mla", mla), device="cpu", head_range=(0, 1))
    w.store(toks, src, slots)
    w.flush()
    w.close()
    r = CacheEngine(cfg, ModelIdentity("mla", mla), device="cpu", head_range=(0, 1))
    dst = TokenSlotKV([torch.zeros(TOKENS, 1, 12, dtype=mla.dtype) for _ in range(2)], None, 0)
    assert r.retrieve(toks, dst, slots) == TOKENS
    assert all(same_bits(a, b) for a, b in zip(dst.k, src.k))
    r.close()
