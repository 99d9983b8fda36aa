"""The remote tier against real redis-server processes on loopback (no fakes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from redisutil import RedisServer, free_port, start_cluster
from tierutil import engine, prompt, retrieved_exactly, store

from lmcache.core.keys import ObjectKey


def test_round_trip_through_redis_with_split_parts(redis_server):
    e = engine(remote_url=redis_server.url, remote_part_mb=1000 / 2**20)  # ~1 KB parts: 2 KiB chunks split
    toks = prompt(96)
    kv, slots = store(e, toks)
    e.flush()
    assert e.stack.remote.stats.stores == 6
    fresh = engine(remote_url=redis_server.url, remote_part_mb=1000 / 2**20)
    assert fresh.lookup_tiers(toks) == ["redis"] * 6
    assert retrieved_exactly(fresh, toks, kv, slots) == 96
    assert fresh.lookup_tiers(toks) == ["cpu"] * 6
    assert len(redis_server.client().keys("lmc:*")) == 6 * 4  # header + 3 parts each


def test_engines_with_different_part_sizes_share_objects_and_remove_every_part(redis_server):
    """The header records the writer's part size: a reader (or remover) with another remote_part_mb finds
    every part instead of calling the object truncated and deleting it for everyone."""
    small = engine(remote_url=redis_server.url, remote_part_mb=700 / 2**20)  # 2 KiB chunks in 3 parts
    toks = prompt(64)
    kv, slots = store(small, toks)
    small.flush()
    raw = redis_server.client()
    assert len(raw.keys("lmc:*")) == 4 * 4
    big = engine(remote_url=redis_server.url, remote_part_mb=8)  # would expect one part
    assert big.lookup_tiers(toks) == ["redis"] * 4
    assert retrieved_exactly(big, toks, kv, slots) == 64
    assert big.stack.remote.stats.corrupt == 0 and len(raw.keys("lmc:*")) == 16  # nothing deleted
    # the other way round: objects in one part, read by an engine that splits small
    toks2 = prompt(32, 5)
    kv2, slots2 = store(big, toks2, seed=5)
    big.flush()
    assert retrieved_exactly(engine(remote_url=redis_server.url, remote_part_mb=700 / 2**20), toks2, kv2, slots2) == 32
    # remove by an engine with the other part size leaves no part behind
    for k in big.hasher().keys(toks):
        assert big.stack.remote.remove(big.object_key(k))
    assert len(raw.keys("lmc:*")) == 2 * 2  # only toks2's two objects (header + one part each) are left


def test_a_lost_header_leaves_no_orphaned_parts(redis_server):
    e = engine(remote_url=redis_server.url, remote_part_mb=700 / 2**20)
    toks = prompt(16)
    store(e, toks)
    e.flush()
    raw = redis_server.client()
    key = e.object_key(e.hasher().keys(toks)[0])
    raw.delete(f"lmc:{{{key}}}:h")  # the header is gone (evicted by Redis's own LRU): its parts are orphans
    e.stack.remote.remove(key)
    assert raw.keys("lmc:*") == []


def test_corrupt_remote_object_is_a_miss_and_deleted(redis_server):
    e = engine(remote_url=redis_server.url)
    toks = prompt(32)
    kv, slots = store(e, toks)
    e.flush()
    key = ObjectKey(e.hasher().keys(toks)[1], 0, 2)
    raw = redis_server.client()
    part = f"lmc:{{{key}}}:0"
    data = bytearray(raw.get(part))
    data[10] ^= 1
    raw.set(part, bytes(data))
    fresh = engine(remote_url=redis_server.url)
    assert retrieved_exactly(fresh, toks, kv, slots) == 16
    assert fresh.stack.remote.stats.corrupt == 1
    assert raw.get(f"lmc:{{{key}}}:h") is None


def test_unreachable_at_start_keeps_serving_from_cpu():
    e = engine(remote_url=f"redis://127.0.0.1:{free_port()}/0", remote_timeout_s=0.2)
    toks = prompt(48)
    t0 = time.monotonic()
    kv, slots = store(e, toks)
    assert e.lookup(prompt(48, 5)) == 0  # a miss everywhere, remote included, without an exception
    assert retrieved_exactly(e, toks, kv, slots) == 48
    e.flush()
    assert time.monotonic() - t0 < 10
    assert e.stack.remote.stats.errors >= 1 and e.stack.remote.stats.drops >= 1


def test_redis_down_and_back_mid_workload(tmp_path):
    server = RedisServer(tmp_path, persist=True).start()  # its data survives its restart
    e = engine(chunks_in_cpu=16, remote_url=server.url, remote_timeout_s=0.3)
    e.stack.remote.health.retry_interval_s = 0.2
    try:
        first = prompt(32, 1)
        kv1, s1 = store(e, first)
        e.flush()
        server.stop()  # the server goes away mid-run
        for i in range(10):  # the engine keeps serving: stores land in CPU, remote-only lookups miss
            toks = prompt(32, 10 + i)
            kv, slots = store(e, toks, seed=10 + i)
            assert retrieved_exactly(e, toks, kv, slots) == 32
        e.flush()
        assert e.stack.remote.stats.errors >= 1
        assert e.lookup_tiers(first) == []  # evicted from CPU; the remote copy is unreachable: a miss
        server.start()  # same port: the tier reconnects by itself, once its quiet period (doubled per failure in a
        # row while the server was down: how many depends on this machine's speed) has passed
        deadline = time.monotonic() + 15
        while e.lookup_tiers(first) != ["redis", "redis"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert e.lookup_tiers(first) == ["redis", "redis"]
        assert retrieved_exactly(e, first, kv1, s1) == 32
        later = prompt(32, 99)
        store(e, later, seed=99)
        e.flush()
        assert engine(remote_url=server.url).lookup_tiers(later) == ["redis", "redis"]
    finally:
        server.stop()


def test_queue_full_drops_instead_of_blocking(redis_server):
    e = engine(remote_url=redis_server.url, writeback_queue_size=1, remote_timeout_s=2.0)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the server hangs: writes stall until the timeout
    try:
        t0 = time.monotonic()
        store(e, prompt(160))
        assert time.monotonic() - t0 < 1.5  # the engine did not wait for the stalled tier
        assert e.stack.writeback["redis"].stats.drops >= 7
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    e.flush()


SHARER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    from tierutil import engine, prompt, store
    e = engine(remote_url=sys.argv[1])
    store(e, prompt(80, 42), seed=42)
    e.close()
    print("stored")
''')


def test_two_processes_share_one_redis(redis_server, tmp_path):
    script = tmp_path / "sharer.py"
    script.write_text(SHARER)
    out = subprocess.run([sys.executable, str(script), redis_server.url, os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "stored", out.stderr
    from kvutil import slots_for
    from tierutil import source

    here = engine(remote_url=redis_server.url)
    toks = prompt(80, 42)
    assert here.lookup(toks) == 80
    assert retrieved_exactly(here, toks, source(42), slots_for(80, 1024, 16, True, 42)) == 80


@pytest.fixture
def cluster(tmp_path):
    nodes = start_cluster(tmp_path)
    yield nodes
    for n in nodes:
        n.stop()


def test_redis_cluster_three_masters(cluster):
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster[:2])
    e = engine(remote_url=url)
    toks = prompt(320)
    kv, slots = store(e, toks)
    e.flush()
    assert e.stack.remote.stats.stores == 20 and e.stack.remote.stats.errors == 0
    per_node = [len(n.client().keys("lmc:*")) for n in cluster]
    assert sum(per_node) == 40 and sum(1 for c in per_node if c) >= 2  # spread over the masters
    fresh = engine(remote_url=url)
    assert fresh.lookup_tiers(toks) == ["redis"] * 20
    assert retrieved_exactly(fresh, toks, kv, slots) == 320


def test_bad_remote_urls_are_clear():
    for url, msg in [("memcached://x:1", "no storage tier handles 'memcached://'"),
                     ("redis+cluster://nohostport", "cluster seeds must be host:port"),
                     ("redis://127.0.0.1:6379/abc", "must be a database number")]:
        with pytest.raises(ValueError, match=msg):
            engine(remote_url=url)


def test_password_from_env_or_url(tmp_path):
    from redisutil import REDIS_SERVER, free_port

    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--requirepass", "s3cret"], stdout=subprocess.DEVNULL)
    try:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password="s3cret").ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        from lmcache.core.config import load_config

        cfg = load_config(env={"LMCACHE_REMOTE_PASSWORD": "s3cret"})
        e = engine(remote_url=f"redis://127.0.0.1:{port}/0", remote_password=cfg.remote_password)
        toks = prompt(32)
        store(e, toks)
        e.flush()
        assert e.stack.remote.stats.stores == 2
        via_url = engine(remote_url=f"redis://:s3cret@127.0.0.1:{port}/0")
        assert via_url.lookup_tiers(toks) == ["redis", "redis"]
        wrong = engine(remote_url=f"redis://:nope@127.0.0.1:{port}/0")
        assert wrong.lookup(toks) == 0 and wrong.stack.remote.stats.errors == 1
        assert "***" in wrong.stack.remote._safe_url() and "nope" not in wrong.stack.remote._safe_url()
    finally:
        proc.terminate()
        proc.wait()
