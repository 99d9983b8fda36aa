"""MP mode against a real ``lmcache server`` process, real sockets on loopback, real client processes."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from serverutil import ServerProcess
from tierutil import engine, prompt, retrieved_exactly, source, store

from lmcache.server.protocol import ProtocolError

HERE = os.path.dirname(__file__)


@pytest.fixture
def server():
    s = ServerProcess("--lease-timeout", "1").start()
    yield s
    s.stop()


def mp(url, **over):
    return engine(mode="mp", server_url=url, remote_timeout_s=over.pop("remote_timeout_s", 2.0), **over)


def test_round_trip_between_engines_and_transports(server):
    a = mp(server.url)
    toks = prompt(96)
    kv, slots = store(a, toks)
    assert a.lookup_tiers(toks) == ["cpu"] * 6
    b = mp(server.url)
    assert retrieved_exactly(b, toks, kv, slots) == 96
    byte_client = mp(server.url, mp_transport="bytes")  # a client that cannot map the pool
    assert retrieved_exactly(byte_client, toks, kv, slots) == 96
    other = prompt(48, 3)
    kv2, s2 = store(byte_client, other, seed=3)
    assert retrieved_exactly(b, other, kv2, s2) == 48
    assert b.store(toks, kv, slots).existing_chunks == 6  # nothing is stored twice
    shm = [f for f in os.listdir("/dev/shm") if f.startswith(f"lmcache-{server.port}-")]
    assert len(shm) == 1 and stat.S_IMODE(os.stat(f"/dev/shm/{shm[0]}").st_mode) == 0o600


WORKER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[3])
    from tierutil import engine, prompt, retrieved_exactly, store
    from kvutil import slots_for, vllm_layout
    import torch
    me = int(sys.argv[2])
    e = engine(mode="mp", server_url=sys.argv[1], remote_timeout_s=5.0)
    shared = prompt(64, 1000)
    for j in range(12):
        toks = shared[: 16 * (1 + (me + j) % 4)] + prompt(32, 100 * me + j)
        kv = vllm_layout("LBNHC", __import__("tierutil").GEO, 64, 16, seed=1)  # same bits for the same tokens' slots
        pre = 16 * (1 + (me + j) % 4)
        slots = torch.cat([torch.arange(pre), 64 + slots_for(32, 1024 - 64, 16, True, 100 * me + j)])
        e.store(toks, kv, slots)
        got = retrieved_exactly(e, toks, kv, slots)
        assert got == len(toks), (got, len(toks))
    print("worker ok")
''')


def test_four_processes_at_once(server, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), server.url, str(i), HERE], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "worker ok", err
    stats = server.http("GET", "/stats")
    assert stats["leases"] == 0 and stats["server"]["errors"] == 0
    assert stats["server"]["requests"] >= 4 * 12 * 3
    deadline = time.monotonic() + 10  # the workers exited: their sessions are forgotten (their locks are free)
    while server.http("GET", "/stats")["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.http("GET", "/stats")["sessions"] == 0


HOLDER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tierutil import engine, prompt
    e = engine(mode="mp", server_url=sys.argv[1])
    okeys = [e.object_key(k) for k in e.hasher().keys(prompt(32))]
    slots = e.stack.reserve_many([(k, 2048) for k in okeys])   # pins pool memory, never commits
    assert all(s is not None for s in slots)
    print("holding", flush=True)
    time.sleep(600)
''')


def test_killed_client_leaks_nothing(server, tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    p = subprocess.Popen([sys.executable, str(script), server.url, HERE], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    assert server.http("GET", "/stats")["leases"] == 1
    time.sleep(2.5)  # past the 1 s lease timeout: the client is slow, not dead, so its memory stays its own
    assert server.http("GET", "/stats")["leases"] == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while server.http("GET", "/stats")["leases"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = server.http("GET", "/stats")
    assert stats["leases"] == 0 and stats["pool"]["used"] == 0 and stats["server"]["expired_leases"] == 1
    e = mp(server.url)
    toks = prompt(32, 7)
    kv, slots = store(e, toks, seed=7)
    assert retrieved_exactly(e, toks, kv, slots) == 32


def test_server_restart_with_disk_tier(tmp_path):
    s = ServerProcess("--disk-path", str(tmp_path / "disk")).start()
    e = mp(s.url, remote_timeout_s=0.5)
    e.stack.retry_interval_s = 0.2
    toks = prompt(64)
    kv, slots = store(e, toks)
    assert s.stop() == 0 and "shutting down" in s.output  # SIGTERM: clean stop, write-back flushed
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"lmcache-{s.port}-")]
    t0 = time.monotonic()
    assert e.lookup(toks) == 0  # down: a miss, not an exception
    r = e.store(prompt(32, 2), source(2), slots[:32])
    assert r.stored_chunks == 0 and r.dropped_chunks == 2
    assert time.monotonic() - t0 < 5
    s.start()
    time.sleep(0.3)
    assert e.lookup_tiers(toks) == ["disk"] * 4  # reconnected by itself; chunks survived the restart on disk
    assert retrieved_exactly(e, toks, kv, slots) == 64
    assert e.stack.stats.errors >= 1
    s.stop()


def test_protocol_version_mismatch_is_a_clear_error(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.url)
    sock.send(msgspec.msgpack.encode({"v": 99, "op": "hello", "id": 5}))
    assert sock.poll(5000)
    reply = msgspec.msgpack.decode(sock.recv())
    assert reply["ok"] is False and "protocol version 99 is not supported" in reply["error"] and reply["id"] == 5
    sock.close(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda op, extra: msgspec.msgpack.encode({"v": 1, "op": op, "id": 1, "session": "x", **extra}),
              st.sampled_from(["lookup", "reserve", "commit", "acquire", "release", "put", "get", "nope", "hello"]),
              st.dictionaries(st.sampled_from(["keys", "items", "lease", "key", "header", "model", "geometry"]),
                              st.one_of(st.integers(-2**40, 2**40), st.binary(max_size=20), st.text(max_size=20),
                                        st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=40)), max_size=4)))),
), min_size=1, max_size=3))
def test_garbage_on_the_wire_is_answered_and_the_server_keeps_serving(fuzz_server, frames):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fuzz_server.url)
    sock.send_multipart(frames)
    assert sock.poll(5000), "the server went silent"
    reply = msgspec.msgpack.decode(sock.recv_multipart()[0])
    assert isinstance(reply["ok"], bool)
    sock.close(0)


@pytest.fixture(scope="module")
def fuzz_server():
    s = ServerProcess().start()
    yield s
    e = mp(s.url)  # after all the garbage, a normal client is served correctly
    toks = prompt(32, 11)
    kv, slots = store(e, toks, seed=11)
    assert retrieved_exactly(e, toks, kv, slots) == 32
    counters = s.http("GET", "/stats")["server"]
    s.stop()
    assert counters["bad_messages"] > 0  # the garbage was answered with errors
    if counters["errors"]:  # answered too, but through the internal-error path: worth a look, not a failure
        import warnings

        warnings.warn(f"server hit {counters['errors']} internal errors under fuzzing:\n{s.output[-3000:]}", stacklevel=1)


def test_token_and_bind_rules(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "server", "--host", "0.0.0.0", "--http-port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--allow-remote and --token" in r.stderr
    s = ServerProcess("--token", "sesame").start()
    try:
        with pytest.raises(ProtocolError, match="token"):
            mp(s.url, server_token="wrong").lookup(prompt(16))
        ok = mp(s.url, server_token="sesame")
        toks = prompt(16)
        store(ok, toks)
        assert ok.lookup(toks) == 16
        with pytest.raises(urllib.error.HTTPError) as e:
            s.http("POST", "/clear", {}, auth=False)
        assert e.value.code == 401
        assert s.http("POST", "/clear", {}, {"Authorization": "Bearer sesame"})["cleared"] == 1
    finally:
        s.stop()


def test_http_management_api(server):
    e = mp(server.url)
    toks = prompt(48)
    kv, slots = store(e, toks)
    retrieved_exactly(e, toks, kv, slots)
    assert server.http("GET", "/health")["ok"] is True
    clients = server.http("GET", "/clients")
    assert any(c["model"] == "tier-test" for c in clients)
    looked = server.http("POST", "/lookup", {"tokens": toks + [1, 2, 3]})
    assert looked["models"]["tier-test"] == {"cached_tokens": 48, "per_tier": {"cpu": 48}}
    metrics = server.http("GET", "/metrics")
    for name in ("lmcache_chunk_hits_total", "lmcache_hit_ratio", "lmcache_pool_bytes", "lmcache_connected_clients",
                 'lmcache_request_seconds_bucket{le="0.001",op="acquire"}', "lmcache_writeback_queue_depth"):
        assert name in metrics, name
    with pytest.raises(urllib.error.HTTPError) as bad:
        server.http("POST", "/lookup", {"tokens": "abc"})
    assert bad.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as unknown:
        server.http("POST", "/lookup", {"tokens": toks, "model": "no-such-model"})
    assert unknown.value.code == 404 and "tier-test" in unknown.value.read().decode()  # says which models it knows
    assert all(c["last_seen"].endswith("Z") for c in clients)  # times a person can read
    assert server.http("POST", "/clear", {})["cleared"] == 3  # loopback, no token configured
    assert e.lookup(toks) == 0


def test_pool_larger_than_dev_shm_is_refused_with_a_fix():
    free_gib = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize / 2**30
    from redisutil import free_port

    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    size = free_gib + 0.5
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "server", "--http-port", "0", "--port", str(free_port()),
                        "--cpu-size-gb", f"{size:.2f}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    if size > 0.8 * ram_gib:  # a /dev/shm this large: the RAM check (also one line, with its fix) comes first
        assert "of this machine's" in r.stderr and "use at most" in r.stderr
    else:
        assert "does not fit in /dev/shm" in r.stderr and "--shm-size" in r.stderr


def test_a_stalled_client_keeps_its_lease_until_it_dies(server, tmp_path):
    """Memory a live client may still write is never handed to anyone else, however long it stalls; its
    death releases it."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    p = subprocess.Popen([sys.executable, str(script), server.url, HERE], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        p.send_signal(signal.SIGSTOP)
        time.sleep(12 * 1.0)  # past ten lease timeouts (the old hard limit)
        stats = server.http("GET", "/stats")
        assert stats["leases"] == 1 and stats["stalled_leases"] == 1 and stats["pool"]["used"] > 0
        p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.http("GET", "/stats")["leases"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = server.http("GET", "/stats")
        assert stats["leases"] == 0 and stats["pool"]["used"] == 0
    finally:
        p.kill()
        p.wait()


def test_engines_read_the_servers_eviction_log(tmp_path):
    """The server evicts in mp mode; an engine that announces evictions (KV events) reads them from the
    server's log: each chunk once, with where it went, and only those after it started reading."""
    from tierutil import CHUNK_BYTES

    s = ServerProcess("--cpu-size-gb", f"{8 * CHUNK_BYTES / 2**30:.9f}", "--client-quota-gb", f"{8 * CHUNK_BYTES / 2**30:.9f}",
                      "--disk-path", str(tmp_path / "d")).start()
    try:
        old = mp(s.url)
        store(old, prompt(64, 7), seed=7)  # before the reader starts: not reported
        reader = mp(s.url)
        seen = []
        reader.stack.eviction_listeners.append(lambda key, where: seen.append((str(key), where)))
        assert reader.stack.poll_evictions() == 0  # starts reading from now
        first = prompt(128, 1)
        store(reader, first, seed=1)  # 8 chunks: the pool is full
        store(reader, prompt(64, 2), seed=2)  # 4 more push the 4 oldest out, to disk
        assert reader.stack.poll_evictions() == len(seen) and len(seen) >= 4
        # "disk": handed to the disk tier's write-back; None: gone (write-back may pin only a quarter of this
        # tiny pool, so under load some are dropped - the log says which)
        assert {where for _, where in seen} <= {"disk", None} and len(set(seen)) == len(seen)
        evicted_now = {k for k, _ in seen}
        assert reader.stack.poll_evictions() == 0  # nothing new: each eviction is read once
        assert evicted_now.isdisjoint(str(reader.object_key(k)) for k in reader.hasher().keys(prompt(64, 2)))
    finally:
        s.stop()


def test_a_pool_larger_than_dev_shm_is_refused_before_anything_is_allocated():
    from lmcache.server.shm import SharedBuffer

    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError, match="does not fit in /dev/shm.*--shm-size"):
        SharedBuffer.create(free + (1 << 30), tag="test-")
    assert set(os.listdir("/dev/shm")) == before
