"""Eviction keeps prefix chains whole: after a long random load no cached chunk is unreachable (its prefix
gone), in-process, in the server and on disk, and the hit ratio under pressure is at least plain LRU's."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from serverutil import ServerProcess
from tierutil import CHUNK, CHUNK_BYTES, GEO, engine, prompt, source

from lmcache.core.chunk_format import encode, header_for
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.tiers.disk import DiskTier

CAPACITY = 48  # chunks in the CPU tier


def workload(seed: int, requests: int) -> list[list[int]]:
    """Requests over 24 documents (a few hot), each a document's first 1-8 chunks: prompts grow, share
    heads, and come back after other documents pushed them out."""
    rng = random.Random(seed)
    docs = [prompt(8 * CHUNK, 100 + d) for d in range(24)]
    out = []
    for _ in range(requests):
        d = min(int(rng.expovariate(0.15)), len(docs) - 1)
        out.append(docs[d][: rng.randint(1, 8) * CHUNK])
    return out


def run(e, requests: list[list[int]]) -> int:
    """Serve each request the way an engine does (load the cached prefix, store the rest); hit tokens."""
    kv = source(1)
    hits = 0
    for toks in requests:
        slots = torch.arange(len(toks))
        hits += e.retrieve(toks, kv, slots)
        e.store(toks, kv, slots)
    return hits


def plain_lru_hits(requests: list[list[int]], capacity: int, hasher) -> int:
    """The same requests against per-chunk LRU (touch head to tail, store new chunks after)."""
    lru: OrderedDict[bytes, None] = OrderedDict()
    hits = 0
    for toks in requests:
        keys = hasher.keys(toks)
        n = 0
        while n < len(keys) and keys[n] in lru:
            lru.move_to_end(keys[n])
            n += 1
        hits += n * CHUNK
        for k in keys[n:]:
            if k not in lru:
                lru[k] = None
                while len(lru) > capacity:
                    lru.popitem(last=False)
    return hits


def unreachable(e, requests: list[list[int]]) -> int:
    """Chunks present in the store whose prefix is not: no lookup can ever reach them."""
    bad = set()
    for toks in {tuple(t) for t in requests}:
        okeys = [e.object_key(k) for k in e.hasher().keys(list(toks))]
        present = [len(e.stack.lookup_tiers([k])) == 1 for k in okeys]
        reachable = len(e.stack.lookup_tiers(okeys))
        bad.update(k for k, p in zip(okeys[reachable:], present[reachable:]) if p)
    return len(bad)


def check(e, capacity: int) -> None:
    requests = workload(7, 1500)
    hits = run(e, requests)
    assert unreachable(e, requests) == 0
    lru = plain_lru_hits(requests, capacity, e.hasher())
    assert lru > 0 and hits >= lru, f"chain-aware eviction hit {hits} tokens, plain LRU {lru}"


def test_no_unreachable_chunk_in_process_and_hit_ratio_at_least_lru():
    e = engine(chunks_in_cpu=CAPACITY)
    check(e, CAPACITY)
    e.close()


@pytest.fixture(scope="module")
def small_server():
    size = f"{CAPACITY * CHUNK_BYTES / 2**30:.9f}"
    s = ServerProcess("--cpu-size-gb", size, "--client-quota-gb", size).start()
    yield s
    s.stop()


def test_no_unreachable_chunk_in_the_server(small_server):
    e = engine(mode="mp", server_url=small_server.url, remote_timeout_s=5.0)
    check(e, CAPACITY)
    e.close()


def test_disk_tier_evicts_a_chain_tail_first(tmp_path):
    """Chains written to a small disk tier, with reads in between: every file left has its parent."""
    per = header_for(GEO, b"F" * 16, b"K" * 16, CHUNK, 0, 2)
    tier = DiskTier(str(tmp_path), 40 * (per.sealed_nbytes + per.payload_nbytes))
    payload = torch.zeros(per.payload_nbytes, dtype=torch.uint8)
    pool = HostMemoryPool(4 * per.payload_nbytes)
    rng = random.Random(3)
    chains = [[bytes([c, i]) * 8 for i in range(8)] for c in range(30)]
    for _ in range(600):
        chain = chains[min(int(rng.expovariate(0.2)), len(chains) - 1)][: rng.randint(1, 8)]
        for i, key in enumerate(chain):
            okey = ObjectKey(key, 0, 2)
            if tier.contains(okey):
                got = tier.load(okey, pool.allocate)  # a read touches it
                if got is not None:
                    got[1].unref()
                continue
            tier.put(okey, *encode(header_for(GEO, b"F" * 16, key, CHUNK, 0, 2, chain[i - 1] if i else bytes(16)), payload))
    present = {k for chain in chains for k in chain if tier.contains(ObjectKey(k, 0, 2))}
    assert 0 < len(present) <= 40
    for chain in chains:
        for parent, child in zip(chain, chain[1:]):
            assert child not in present or parent in present, "a chunk outlived its prefix on disk"
    tier.close()
