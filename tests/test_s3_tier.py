"""The S3 tier against a real Ceph object gateway (radosgw over a one-OSD RADOS cluster) on loopback: no
emulator. Round trips bit-exact, multipart objects, ranged head reads, the gateway killed mid-write and
restarted, poisoned objects, bad credentials and buckets, two engines on one bucket, the server on S3, and
S3 below Redis."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest
import torch
from serverutil import ServerProcess
from tierutil import CHUNK, engine, prompt, retrieved_exactly, slots_for, source, store

from lmcache.core.chunk_format import encode, header_for
from lmcache.core.config import load_config
from lmcache.core.geometry import model_shape
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.tiers.s3_tier import S3Tier

TESTS = Path(__file__).resolve().parent


def s3_config(s3, **over):
    return load_config(env={}, overrides={**s3.overrides(), **over})


def big_object(tokens: int, seed: int = 0):
    """A real-sized chunk (llama-3-8b shape: 128 KiB per token) with known random bytes."""
    g = model_shape("llama-3-8b")
    key = ObjectKey(blake3.blake3(f"big-{seed}-{tokens}".encode()).digest(16), 0, g.num_kv_heads, g.num_kv_heads)
    header = header_for(g, b"F" * 16, key.chunk, tokens, 0, g.num_kv_heads)
    payload = torch.empty(header.payload_nbytes, dtype=torch.uint8).random_(generator=torch.Generator().manual_seed(seed))
    sealed, view = encode(header, payload)
    return key, header, sealed, view, payload


def wait_for(cond, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError("condition not met in time")


# -- round trips ------------------------------------------------------------------------------------------


def test_chunks_round_trip_through_s3_bit_exact_and_are_found_by_a_fresh_engine(s3):
    e = engine(**s3.overrides())
    toks = prompt(96)
    kv, slots = store(e, toks)
    e.flush()
    assert e.stack.remote.stats.stores == 6 and len(s3.keys()) == 6
    assert all(k.startswith("kv/") for k in s3.keys())
    fresh = engine(**s3.overrides())
    assert fresh.lookup_tiers(toks) == ["s3"] * 6
    assert retrieved_exactly(fresh, toks, kv, slots) == 96
    assert fresh.lookup_tiers(toks) == ["cpu"] * 6  # promoted on the hit
    assert fresh.stack.remote.stats.corrupt == 0
    e.close()
    fresh.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_every_dtype_reads_back_bit_exact(s3, dtype):
    from lmcache.core.geometry import KVGeometry

    g = KVGeometry(3, 4, 8, 8, dtype)
    key = ObjectKey(blake3.blake3(str(dtype).encode()).digest(16), 0, 4, 4)
    header = header_for(g, b"D" * 16, key.chunk, 16, 0, 4)
    payload = torch.empty(header.payload_nbytes, dtype=torch.uint8).random_(generator=torch.Generator().manual_seed(3))
    tier = S3Tier(s3.url, s3_config(s3))
    assert tier.put(key, *encode(header, payload))
    pool = HostMemoryPool(1 << 20)
    got = tier.load(key, pool.allocate)
    assert got is not None and got[0].dtype == dtype
    assert torch.equal(got[1].raw[: header.payload_nbytes], payload)
    tier.close()


def test_a_large_chunk_is_a_multipart_object_read_back_by_parallel_ranges(s3):
    """12 MiB in 5 MiB parts: uploaded as a multipart object (its ETag says how many parts), read back with
    ranged GETs in parallel into the pool, and a head shard across part boundaries read with its range only."""
    tier = S3Tier(s3.url, s3_config(s3, s3_part_mb=5, s3_multipart_mb=6))
    key, header, sealed, view, payload = big_object(96)
    assert header.payload_nbytes == 12 << 20
    assert tier.put(key, sealed, view)
    meta = s3.client().head_object(Bucket=s3.name, Key=tier.object_name(key))
    assert meta["ETag"].strip('"').endswith("-3") and meta["ContentLength"] == len(sealed) + len(view)
    pool = HostMemoryPool(64 << 20)
    got = tier.load(key, pool.allocate)
    assert got is not None and torch.equal(got[1].raw[: header.payload_nbytes], payload)
    got[1].unref()
    per = header.head_nbytes
    out = bytearray(3 * per)
    assert tier.load_heads(key, 2, 5, lambda h: memoryview(out)) is not None  # heads 2-4: 1.5 MiB each, mid-object
    assert bytes(out) == payload[2 * per : 5 * per].numpy().tobytes()
    assert tier.stats.corrupt == 0
    tier.close()


@pytest.mark.parametrize("store_tp,load_tp", [(1, 2), (2, 1), (4, 1), (1, 4), (8, 2)])
def test_engines_of_different_tp_sizes_share_through_s3(s3, store_tp, load_tp):
    from test_tp_sharing import share

    share(store_tp, load_tp, f"s3-{store_tp}-{load_tp}", **s3.overrides())


# -- the store going away ---------------------------------------------------------------------------------


def _kill_during(ceph, write, started) -> bool:
    """Run ``write()`` in a thread, SIGKILL radosgw once ``started()`` says the write is under way, restart it;
    what ``write`` returned."""
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(write()))
    t.start()
    try:
        wait_for(started, timeout=30, step=0.01)
    finally:
        ceph.kill("rgw")
    t.join(60)
    ceph.start_rgw()
    assert not t.is_alive() and result, "the write hung after the gateway was killed"
    return result[0]


def test_radosgw_killed_mid_multipart_upload_leaves_no_visible_object(s3):
    tier = S3Tier(s3.url, s3_config(s3, s3_part_mb=5, s3_multipart_mb=6))
    tier.health.retry_interval_s = 0.2
    key, _, sealed, view, _ = big_object(1600)  # 200 MiB: ~40 parts, seconds of upload on 2 cores
    client = s3.client()
    ok = _kill_during(s3.ceph, lambda: tier.put(key, sealed, view),
                      lambda: client.list_multipart_uploads(Bucket=s3.name).get("Uploads"))
    assert ok is False  # killed mid-upload: the put says so (no exception)
    assert s3.keys() == []  # and nothing appeared under the key: S3 shows an object only once completed
    assert not tier.contains(key)
    # the tier comes back by itself once the gateway is up again
    small_key, _, small_sealed, small_view, small_payload = big_object(8, seed=1)
    wait_for(lambda: tier.put(small_key, small_sealed, small_view), timeout=15, step=0.3)
    got = tier.load(small_key, HostMemoryPool(4 << 20).allocate)
    assert got is not None and torch.equal(got[1].raw[: len(small_payload)], small_payload)
    tier.close()


def test_radosgw_killed_mid_single_put_leaves_no_visible_object(s3):
    tier = S3Tier(s3.url, s3_config(s3, s3_multipart_mb=1024))
    key, _, sealed, view, _ = big_object(2048)  # 256 MiB in one PUT
    t0 = time.monotonic()
    ok = _kill_during(s3.ceph, lambda: tier.put(key, sealed, view), lambda: time.monotonic() - t0 > 0.4)
    assert ok is False
    assert s3.keys() == [] and not tier.contains(key)
    tier.close()


def test_an_engine_rides_out_the_gateway_going_away_and_coming_back(s3, caplog):
    e = engine(**s3.overrides(s3_timeout_s=2))
    e.stack.remote.health.retry_interval_s = 0.2
    s3.ceph.kill("rgw")
    try:
        toks = prompt(48, 3)
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            kv, slots = store(e, toks, seed=3)  # no exception reaches the engine
            e.flush()
            assert e.lookup_tiers(prompt(32, 4)) == []
        assert e.stack.remote.stats.errors >= 1
        assert any("nothing answers at" in r.getMessage() and "s3_endpoint_url" in r.getMessage() for r in caplog.records)
    finally:
        s3.ceph.start_rgw()
    toks2 = prompt(48, 5)
    time.sleep(0.3)
    kv2, slots2 = store(e, toks2, seed=5)
    e.flush()
    wait_for(lambda: len(s3.keys()) == 3, timeout=15)
    assert retrieved_exactly(engine(**s3.overrides()), toks2, kv2, slots2) == 48
    e.close()


# -- poisoned objects -------------------------------------------------------------------------------------


def _poisoned(s3, poison) -> tuple:
    """Store three chunks, apply ``poison(client, name_of_chunk_1, name_of_chunk_0)``, read with a fresh engine."""
    e = engine(**s3.overrides())
    toks = prompt(48, 7)
    kv, slots = store(e, toks, seed=7)
    e.flush()
    keys = [e.object_key(k) for k in e.hasher().keys(toks)]
    names = [e.stack.remote.object_name(k) for k in keys]
    poison(s3.client(), s3.name, names[1], names[0])
    fresh = engine(**s3.overrides())
    loaded = retrieved_exactly(fresh, toks, kv, slots)  # every loaded byte checked against what was stored
    return loaded, fresh.stack.remote.stats, names, s3.keys()


def _rewrite(client, bucket, name, data):
    client.put_object(Bucket=bucket, Key=name, Body=data)


def test_same_length_garbage_is_a_counted_miss_and_deleted(s3):
    def poison(c, b, victim, _):
        size = c.head_object(Bucket=b, Key=victim)["ContentLength"]
        _rewrite(c, b, victim, os.urandom(size))
    loaded, stats, names, left = _poisoned(s3, poison)
    assert loaded == CHUNK and stats.corrupt == 1 and names[1] not in left


def test_a_flipped_payload_bit_is_a_counted_miss_and_deleted(s3):
    def poison(c, b, victim, _):
        data = bytearray(c.get_object(Bucket=b, Key=victim)["Body"].read())
        data[-5] ^= 0x10
        _rewrite(c, b, victim, bytes(data))
    loaded, stats, names, left = _poisoned(s3, poison)
    assert loaded == CHUNK and stats.corrupt == 1 and names[1] not in left


def test_another_keys_object_is_a_counted_miss_and_deleted(s3):
    def poison(c, b, victim, other):
        _rewrite(c, b, victim, c.get_object(Bucket=b, Key=other)["Body"].read())
    loaded, stats, names, left = _poisoned(s3, poison)
    assert loaded == CHUNK and stats.corrupt == 1 and names[1] not in left and names[0] in left


def test_a_truncated_or_empty_object_is_a_counted_miss_and_deleted(s3):
    def poison(c, b, victim, other):
        data = c.get_object(Bucket=b, Key=victim)["Body"].read()
        _rewrite(c, b, victim, data[: len(data) - 100])
    loaded, stats, names, left = _poisoned(s3, poison)
    assert loaded == CHUNK and stats.corrupt == 1 and names[1] not in left

    def empty(c, b, victim, _):
        _rewrite(c, b, victim, b"")
    loaded, stats, names, left = _poisoned(s3, empty)
    assert loaded == CHUNK and stats.corrupt == 1 and names[1] not in left


# -- bad settings: one line naming the fix, nothing reaches the engine ------------------------------------


def test_wrong_credentials_make_the_tier_miss_with_the_fix_logged(s3, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    e = engine(**s3.overrides())
    toks = prompt(32, 9)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        store(e, toks, seed=9)
        e.flush()
    assert e.stack.remote.stats.errors >= 1 and e.stack.remote.stats.stores == 0
    assert any("AWS_SECRET_ACCESS_KEY" in r.getMessage() for r in caplog.records)
    assert s3.keys() == []
    e.close()


def _doctor(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")} | env_extra
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "doctor", "--json", "--skip-engines"], capture_output=True, text=True,
                       env=env, timeout=120)
    rows = {row["name"]: row for row in json.loads(r.stdout)["checks"]}
    return rows


@pytest.mark.parametrize("fault,found,fix", [
    ("none", "reachable, credentials accepted, bucket exists, writable", ""),
    ("secret", "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
    ("access", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
    ("bucket", "NoSuchBucket", "create it"),
    ("endpoint", "EndpointConnectionError", "s3_endpoint_url"),
    ("nocredentials", "NoCredentialsError", "AWS_PROFILE"),
])
def test_doctor_checks_endpoint_credentials_bucket_and_write_permission(s3, fault, found, fix):
    env = dict(s3.ceph.env()) | {"LMCACHE_REMOTE_URL": s3.url, "LMCACHE_S3_ENDPOINT_URL": s3.ceph.endpoint,
                                 "LMCACHE_S3_TIMEOUT_S": "2"}
    if fault == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    elif fault == "access":
        env["AWS_ACCESS_KEY_ID"] = "NOSUCHKEY"
    elif fault == "bucket":
        env["LMCACHE_REMOTE_URL"] = "s3://no-such-bucket-here/kv/"
    elif fault == "endpoint":
        env["LMCACHE_S3_ENDPOINT_URL"] = "http://127.0.0.1:9"
    elif fault == "nocredentials":  # nothing in the chain: no env keys, no profile file, no instance metadata
        env |= {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    row = _doctor(env)["remote tier"]
    assert row["status"] == ("ok" if fault == "none" else "fail"), row
    assert found in row["found"] and fix in row["fix"], row
    assert s3.keys() == []  # the write check cleaned up after itself


def test_a_bad_s3_url_or_setting_is_one_line_naming_the_fix(s3):
    with pytest.raises(ValueError, match="'Bad_Bucket' is not an S3 bucket name"):
        S3Tier("s3://Bad_Bucket/kv/", s3_config(s3))
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "config", "show", "--set", "s3_part_mb=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "s3_part_mb" in r.stderr and "5..5120" in r.stderr and len(r.stderr.splitlines()) == 1


# -- sharing --------------------------------------------------------------------------------------------------


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from tierutil import engine, prompt, store
e = engine(remote_url={url!r}, s3_endpoint_url={endpoint!r})
store(e, prompt(80, 11), seed=11)
e.flush()
e.close()
"""


def test_two_engine_processes_share_one_bucket(s3):
    code = WRITER.format(tests=str(TESTS), url=s3.url, endpoint=s3.ceph.endpoint)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    toks = prompt(80, 11)
    kv, slots = source(11), slots_for(80, 1024, 16, True, 11)
    reader = engine(**s3.overrides())
    assert reader.lookup_tiers(toks) == ["s3"] * 5
    assert retrieved_exactly(reader, toks, kv, slots) == 80
    reader.close()


def test_s3_below_redis_fills_redis_again_on_a_hit(s3, redis_server):
    both = {"remote_url": f"{redis_server.url} {s3.url}", "s3_endpoint_url": s3.ceph.endpoint}
    e = engine(**both)
    assert [t.name for t in e.stack.lower] == ["redis", "s3"]
    toks = prompt(64, 13)
    kv, slots = store(e, toks, seed=13)
    e.flush()
    assert len(s3.keys()) == 4 and len(redis_server.client().keys("lmc:*:h")) == 4
    redis_server.client().flushall()  # Redis lost everything (restart, maxmemory eviction)
    second = engine(**both)
    assert second.lookup_tiers(toks) == ["s3"] * 4
    assert retrieved_exactly(second, toks, kv, slots) == 64
    second.flush()
    assert len(redis_server.client().keys("lmc:*:h")) == 4  # the S3 hits were kept in Redis, the tier above
    assert engine(**both).lookup_tiers(toks) == ["redis"] * 4


def test_the_server_keeps_its_remote_tier_on_s3_across_a_restart(s3):
    args = ("--remote-url", s3.url, "--set", f"s3_endpoint_url={s3.ceph.endpoint}")
    server = ServerProcess(*args, env=s3.ceph.env()).start()
    try:
        e = engine(mode="mp", server_url=server.url, remote_timeout_s=5.0)
        toks = prompt(64, 17)
        kv, slots = store(e, toks, seed=17)
        e.flush()
        wait_for(lambda: len(s3.keys()) == 4, timeout=30)
        e.close()
    finally:
        server.stop()
    server = ServerProcess(*args, env=s3.ceph.env()).start()  # a fresh pool: only S3 has the chunks
    try:
        e = engine(mode="mp", server_url=server.url, remote_timeout_s=5.0)
        assert retrieved_exactly(e, toks, kv, slots) == 64
        e.close()
    finally:
        server.stop()


# -- capacity and speed -------------------------------------------------------------------------------------


def _lmcache(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")} | env
    return subprocess.run([sys.executable, "-m", "lmcache.cli.main", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_prune_deletes_objects_older_than_asked_and_unfinished_uploads(s3):
    e = engine(**s3.overrides())
    store(e, prompt(64, 19), seed=19)
    e.flush()
    client = s3.client()
    client.create_multipart_upload(Bucket=s3.name, Key="kv/abandoned")  # a writer killed mid-upload
    env = s3.ceph.env() | {"LMCACHE_S3_ENDPOINT_URL": s3.ceph.endpoint}
    kept = _lmcache("s3", "prune", "--url", s3.url, "--older-than", "1h", "--json", env=env)
    assert kept.returncode == 0, kept.stderr
    got = json.loads(kept.stdout)
    assert (got["kept"], got["deleted"], got["uploads_aborted"]) == (4, 0, 0)
    time.sleep(1.1)
    dry = json.loads(_lmcache("s3", "prune", "--url", s3.url, "--older-than", "1s", "--dry-run", "--json", env=env).stdout)
    assert dry["deleted"] == 4 and dry["uploads_aborted"] == 1 and len(s3.keys()) == 4
    done = _lmcache("s3", "prune", "--url", s3.url, "--older-than", "1s", env=env)
    assert done.returncode == 0 and "deleted" in done.stdout
    assert s3.keys() == [] and not client.list_multipart_uploads(Bucket=s3.name).get("Uploads")
    bad = _lmcache("s3", "prune", "--url", s3.url, "--older-than", "7 weeks", env=env)
    assert bad.returncode == 2 and "e.g. 7d or 12h" in bad.stderr


def test_bench_tier_s3_prints_figures_next_to_raw_boto3(s3):
    env = s3.ceph.env() | {"LMCACHE_S3_ENDPOINT_URL": s3.ceph.endpoint}
    r = _lmcache("bench", "tier", "--tier", "s3", "--url", s3.url, "--chunks", "3", "--chunk-tokens", "64", "--json",
                 env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "boto3" in d["baseline"]
    assert all(d[k] > 0 for k in ("write_gbps", "raw_write_gbps", "read_gbps", "raw_read_gbps", "write_ratio", "read_ratio"))
    assert s3.keys() == []  # the benchmark leaves nothing behind


def test_a_long_prompt_is_looked_up_in_a_few_waves_of_heads_and_a_hole_ends_the_loaded_prefix(s3):
    e = engine(**s3.overrides())
    toks = prompt(16 * 60, 21)  # 60 chunks
    kv, slots = store(e, toks, seed=21)
    e.flush()
    fresh = engine(**s3.overrides())
    heads = []
    fresh.stack.remote.client.meta.events.register("before-call.s3.HeadObject", lambda **kw: heads.append(1))
    assert fresh.lookup_tiers(toks) == ["s3"] * 60
    assert len(heads) <= 2 * 8 + 8  # two probing waves and one exact one, not 60 HEADs
    keys = fresh.hasher().keys(toks)
    for k in keys[41:]:  # the prompt's tail is gone (expired): the probes narrow down to where it starts
        s3.client().delete_object(Bucket=s3.name, Key=fresh.stack.remote.object_name(fresh.object_key(k)))
    heads.clear()
    found = fresh.lookup_tiers(toks)
    assert found == ["s3"] * 41, len(found)
    assert len(heads) <= 2 * 8 + 8
    s3.client().delete_object(Bucket=s3.name, Key=fresh.stack.remote.object_name(fresh.object_key(keys[17])))
    # a hole the probes may step over is found at load time: the loaded prefix ends there, every byte exact
    assert retrieved_exactly(fresh, toks, kv, slots) == 17 * 16
    fresh.close()
    e.close()


def test_a_hung_gateway_costs_the_engine_one_timeout_per_quiet_period_not_every_request(s3):
    """radosgw stopped (SIGSTOP): connections are accepted and nothing answers. Lookups and stores must not each
    wait out the timeout: the tier goes quiet, and backs off further while the store stays hung."""
    e = engine(**s3.overrides(s3_timeout_s=1))
    e.stack.remote.health.retry_interval_s = 0.3
    rgw = s3.ceph.procs["rgw"]
    os.killpg(rgw.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        for i in range(40):
            e.lookup(prompt(48, 100 + i))
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        # 40 lookups over ~2 s of sleeping: waiting out the 1 s timeout on each would take 42 s; only the retries
        # after each (doubling) quiet period wait, a handful of them
        assert 1 <= e.stack.remote.stats.errors <= 8 and elapsed < 15, (e.stack.remote.stats.errors, elapsed)
    finally:
        os.killpg(rgw.pid, signal.SIGCONT)
    # back: once the quiet period is over, new chunks reach the bucket again (no restart, no exception)
    wait_for(e.stack.remote.health.usable, timeout=35, step=0.2)
    toks2 = prompt(32, 24)
    kv2, slots2 = store(e, toks2, seed=24)
    e.flush()
    wait_for(lambda: e.stack.remote.contains(e.object_key(e.hasher().keys(toks2)[1])), timeout=10)
    assert retrieved_exactly(engine(**s3.overrides()), toks2, kv2, slots2) == 32
    e.close()
