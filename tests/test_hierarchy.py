"""CPU -> disk -> remote as one hierarchy: where hits live, promotion, demotion, prefetch, statistics."""

from tierutil import engine, prompt, retrieved_exactly, store


def test_lookup_reports_the_tier_of_each_chunk(tmp_path, redis_server):
    e = engine(local_disk_path=str(tmp_path), remote_url=redis_server.url)
    toks = prompt(64)
    kv, slots = store(e, toks)
    e.flush()
    e.clear()  # CPU forgets; disk and redis keep their copies
    e.stack.disk.remove(e.object_key(e.hasher().keys(toks)[2]))
    e.stack.disk.remove(e.object_key(e.hasher().keys(toks)[3]))
    assert e.lookup_tiers(toks) == ["disk", "disk", "redis", "redis"]
    assert retrieved_exactly(e, toks, kv, slots) == 64
    assert e.lookup_tiers(toks) == ["cpu"] * 4
    e.flush()
    assert e.stack.disk.contains(e.object_key(e.hasher().keys(toks)[3]))  # a remote hit is kept on disk too
    stats = e.tier_stats()
    assert stats["disk"]["hits"] == 2 and stats["redis"]["hits"] == 2 and stats["cpu"]["misses"] == 4


def test_promotion_can_be_turned_off(tmp_path):
    e = engine(local_disk_path=str(tmp_path), promote_on_hit=False)
    toks = prompt(32)
    kv, slots = store(e, toks)
    e.flush()
    e.clear()
    assert retrieved_exactly(e, toks, kv, slots) == 32
    assert e.lookup_tiers(toks) == ["disk", "disk"]
    assert e.stack.cpu.pool.used_bytes == 0  # the private copies were freed after the load


def test_eviction_from_cpu_demotes_to_disk(tmp_path):
    e = engine(chunks_in_cpu=16, local_disk_path=str(tmp_path))  # write-back may hold 16/4 = 4 chunks
    wb = e.stack.writeback["disk"]
    budget, wb.max_bytes = wb.max_bytes, 0  # the write-back queue is full: stores are dropped, counted
    a = prompt(64, 1)
    kv_a, slots_a = store(e, a, seed=1)
    assert wb.stats.drops == 4 and len(e.stack.disk) == 0
    wb.max_bytes = budget
    for i in range(2, 6):  # push a out of the CPU tier: eviction hands it to the disk tier
        store(e, prompt(64, i), seed=i)
        e.flush()
    assert e.stack.cpu.stats.evictions >= 4
    assert e.lookup_tiers(a) == ["disk"] * 4
    assert retrieved_exactly(e, a, kv_a, slots_a) == 64


def test_prefetch_pulls_lower_tier_hits_into_cpu(tmp_path):
    e = engine(local_disk_path=str(tmp_path))
    toks = prompt(80)
    kv, slots = store(e, toks)
    e.flush()
    e.clear()
    assert e.lookup_tiers(toks) == ["disk"] * 5
    assert e.prefetch(toks + prompt(16, 9)).result(timeout=30) == 80  # stops at the first miss
    assert e.lookup_tiers(toks) == ["cpu"] * 5
    assert retrieved_exactly(e, toks, kv, slots) == 80


def test_a_run_of_remote_chunks_is_read_side_by_side_and_a_gap_ends_the_prefix(redis_server):
    """Chunks on a remote tier only are read several at a time; one missing in the middle ends the prefix
    there, and what was read past it is neither loaded nor left pinned in the pool."""
    e = engine(remote_url=redis_server.url)
    toks = prompt(96)
    kv, slots = store(e, toks)
    e.flush()
    fresh = engine(remote_url=redis_server.url)
    assert fresh.stack.remote.remove(fresh.object_key(fresh.hasher().keys(toks)[3]))
    assert retrieved_exactly(fresh, toks, kv, slots) == 48
    assert fresh.stack.remote.stats.hits == 5  # chunks 4 and 5 were read in the same run as 0-2
    fresh.clear()
    assert fresh.stack.cpu.pool.used_bytes == 0
