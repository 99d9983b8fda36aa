"""``lmcache server`` never hands out wrong bytes, whoever the client is and however long it stalls.

Each test reproduces, with real processes on loopback (SIGSTOP/SIGCONT, a second local user, raw
sockets), a way a hostile or unlucky client could get wrong bytes to an engine or abuse the daemon.
"""

import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error

import msgspec
import pytest
import zmq
from serverutil import ServerProcess
from tierutil import CHUNK_BYTES, GEO, engine, prompt, retrieved_exactly, store

from lmcache.server.protocol import PROTOCOL_VERSION, ProtocolError

HERE = os.path.dirname(__file__)
GIB = 2**30


def pool_of(chunks: int) -> str:
    return f"{(chunks * CHUNK_BYTES + 1) / GIB:.15f}"


def mp(url, **over):
    return engine(mode="mp", server_url=url, remote_timeout_s=over.pop("remote_timeout_s", 5.0), **over)


class Raw:
    """A hand-written client: one DEALER socket, the server's local secret, no lmcache client code."""

    def __init__(self, server: ServerProcess, token: str | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(server.url)
        self.token = server.secret() if token is None else token
        self.session = None

    def call(self, op: str, frames=(), **fields) -> dict:
        msg = {"v": PROTOCOL_VERSION, "op": op, "id": 1, "token": self.token, "session": self.session, **fields}
        self.sock.send_multipart([msgspec.msgpack.encode(msg), *frames])
        assert self.sock.poll(10000), f"no answer to {op}"
        return msgspec.msgpack.decode(self.sock.recv_multipart()[0])

    def hello(self, model: str = "raw") -> dict:
        """Says hello holding a liveness lock, as a client that maps the pool does."""
        from lmcache.server.local_auth import ClientLock

        self.alive = ClientLock()
        reply = self.call("hello", model=model, alive=self.alive.path)
        self.session = reply.get("session")
        return reply

    def close(self) -> None:
        self.sock.close(0)
        if getattr(self, "alive", None) is not None:
            self.alive.close()


# --- 1, 2: stalled writers and readers -----------------------------------------------------------

STALLED_WRITER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    from tierutil import engine, prompt, source
    from kvutil import slots_for
    e = engine(mode="mp", server_url=sys.argv[1], remote_timeout_s=5.0)
    copy = e.backend.gather
    def gather(kv, jobs):
        print("reserved", flush=True)
        sys.stdin.readline()  # stopped (SIGSTOP) around here by the test; its copy lands afterwards
        copy(kv, jobs)
    e.backend.gather = gather
    r = e.store(prompt(64, 50), source(50), slots_for(64, 1024, 16, True, 50))
    print("stored", r.stored_chunks, r.dropped_chunks, flush=True)
''')

STALLED_READER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    from tierutil import GEO, engine, prompt, store
    from kvutil import same_tokens, sglang_layout, slots_for
    e = engine(mode="mp", server_url=sys.argv[1], remote_timeout_s=5.0)
    toks = prompt(64, 60)
    kv, slots = store(e, toks, seed=60)
    copy = e.backend.scatter
    def scatter(dst, jobs):
        print("acquired", flush=True)
        sys.stdin.readline()
        copy(dst, jobs)
    e.backend.scatter = scatter
    dst = sglang_layout(GEO, 2048, seed=99)
    dst_slots = slots_for(64, 2048, 1, False, 7)
    got = e.retrieve(toks, dst, dst_slots)
    exact = same_tokens(kv, slots[:got], dst, dst_slots[:got], GEO.num_layers)
    print("loaded", got, exact, flush=True)
''')


def _stalled(script_text: str, server: ServerProcess, tmp_path, ready: str) -> subprocess.Popen:
    script = tmp_path / "stalled.py"
    script.write_text(script_text)
    p = subprocess.Popen([sys.executable, str(script), server.url, HERE], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line == ready, (line, p.stderr.read() if p.poll() is not None else "")
    p.send_signal(signal.SIGSTOP)
    time.sleep(3.0)  # past ten lease timeouts of 0.2 s (the old hard limit) and several sweeps
    return p


def _resume(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGCONT)
    p.stdin.write("go\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return out.strip()


def test_a_writer_stalled_past_any_limit_never_overwrites_another_clients_chunks(tmp_path):
    s = ServerProcess("--lease-timeout", "0.2", "--cpu-size-gb", pool_of(8)).start()
    try:
        writer = _stalled(STALLED_WRITER, s, tmp_path, "reserved")  # holds 4 of the pool's 8 chunks
        assert s.http("GET", "/stats")["stalled_leases"] == 1
        victim = mp(s.url)
        toks = prompt(128, 51)
        kv, slots = store(victim, toks, seed=51)  # wants all 8: only the 4 free ones can be had
        assert _resume(writer) == "stored 4 0"  # its memory was its own all along
        assert retrieved_exactly(victim, toks, kv, slots) == 64
        from kvutil import slots_for
        from tierutil import source

        w_kv, w_slots = source(50), slots_for(64, 1024, 16, True, 50)
        assert retrieved_exactly(victim, prompt(64, 50), w_kv, w_slots) == 64
    finally:
        s.stop()


def test_a_reader_stalled_past_any_limit_copies_the_bytes_it_asked_for(tmp_path):
    s = ServerProcess("--lease-timeout", "0.2", "--cpu-size-gb", pool_of(8)).start()
    try:
        reader = _stalled(STALLED_READER, s, tmp_path, "acquired")
        assert s.http("POST", "/clear", {})["cleared"] == 4  # its chunks leave the index ...
        other = mp(s.url)
        toks = prompt(128, 61)
        kv, slots = store(other, toks, seed=61)  # ... but their memory stays the reader's
        assert _resume(reader) == "loaded 64 True"
        assert retrieved_exactly(other, toks, kv, slots) == 64
        assert s.http("GET", "/stats")["leases"] == 0
    finally:
        s.stop()


# --- 3: leases are not capabilities anyone can use ---------------------------------------------------

def test_no_client_can_end_or_use_another_clients_lease():
    s = ServerProcess().start()
    try:
        owner = mp(s.url)
        toks = prompt(32, 70)
        okeys = [owner.object_key(k) for k in owner.hasher().keys(toks)]
        slots = owner.stack.reserve_many([(k, CHUNK_BYTES) for k in okeys])
        lease = slots[0].lease
        clients = s.http("GET", "/clients")
        text = repr(clients)
        assert clients and "session" not in text and "peer" not in text and owner.stack._session not in text
        thief = Raw(s)
        thief.hello()
        assert "unknown or expired lease" in thief.call("abort", lease=lease)["error"]
        thief.session = owner.stack._session  # even a leaked session id works only on its own connection
        assert thief.call("abort", lease=lease)["error"].startswith("unknown session")
        assert thief.call("acquire", keys=[str(k) for k in okeys])["error"].startswith("unknown session")
        thief.close()
        assert s.http("GET", "/stats")["leases"] == 1  # still the owner's
        owner.stack.abort(slots)
        kv, kslots = store(owner, toks, seed=70)
        assert retrieved_exactly(owner, toks, kv, kslots) == 32
    finally:
        s.stop()


# --- 4: another local user ---------------------------------------------------------------------------

OTHER_USER = "lmcache-test-other"

INTRUDER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from tierutil import engine, prompt, source
    from kvutil import slots_for
    from lmcache.server.protocol import ProtocolError
    import lmcache.server.client, lmcache.server.local_auth, hmac, fcntl, secrets  # the stdlib is root's to read
    e = engine(mode="mp", server_url=sys.argv[1], remote_timeout_s=2.0)  # connects on first use
    toks = prompt(32, 80)
    poison, poison_slots, into, into_slots = source(666), slots_for(32, 1024, 16, True, 80), source(5), slots_for(32, 1024, 16, True, 5)
    uid, gid = int(sys.argv[3]), int(sys.argv[4])
    os.setgroups([]); os.setgid(gid); os.setuid(uid)  # from here on, another local user
    results = []
    try:
        open(sys.argv[5], "rb").read(1)
        results.append("read the pool")
    except PermissionError:
        results.append("pool closed")
    try:
        open(sys.argv[6], "rb").read(1)
        results.append("read the secret")
    except PermissionError:
        results.append("secret closed")
    for name, call in (("lookup", lambda: e.lookup(toks)),
                       ("store", lambda: e.store(toks, poison, poison_slots)),
                       ("retrieve", lambda: e.retrieve(toks, into, into_slots))):
        try:
            call()
            results.append(name + " served")
        except ProtocolError as err:
            results.append(name + " refused" if "token" in str(err) else name + " " + str(err))
    print(";".join(results), flush=True)
''')


def _other_user() -> tuple[int, int]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: this test creates a second local user")
        pytest.skip("creating a second local user needs root (CI runs it)")
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True)
        entry = pwd.getpwnam(OTHER_USER)
    return entry.pw_uid, entry.pw_gid


def test_another_local_user_can_neither_read_nor_poison_the_cache(tmp_path):
    uid, gid = _other_user()
    s = ServerProcess().start()
    try:
        owner = mp(s.url)
        toks = prompt(32, 80)
        kv, slots = store(owner, toks, seed=80)
        shm = [f"/dev/shm/{f}" for f in os.listdir("/dev/shm") if f.startswith(f"lmcache-{s.port}-")]
        script = tmp_path / "intruder.py"
        script.write_text(INTRUDER)
        r = subprocess.run([sys.executable, str(script), s.url, HERE, str(uid), str(gid), shm[0],
                            f"/dev/shm/lmcache-{s.port}.key"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "pool closed;secret closed;lookup refused;store refused;retrieve refused"
        assert s.http("GET", "/stats")["server"]["refused_clients"] >= 3
        assert retrieved_exactly(owner, toks, kv, slots) == 32  # the owner's bytes, untouched
    finally:
        s.stop()


# --- 5-9: resource limits ------------------------------------------------------------------------------

def test_one_client_cannot_take_the_pool_or_evict_everything():
    s = ServerProcess("--cpu-size-gb", pool_of(16), "--client-quota-gb", pool_of(4)).start()
    try:
        a = mp(s.url)
        toks = prompt(64, 90)
        kv, slots = store(a, toks, seed=90)
        hog = Raw(s)
        hog.hello()
        whole = hog.call("reserve", items=[[str(a.object_key(bytes(16))), 16 * CHUNK_BYTES]])
        assert not whole["ok"] and "per-client quota" in whole["error"] and "--client-quota-gb" in whole["error"]
        many = hog.call("reserve", items=[[str(a.object_key(bytes([i]) * 16)), CHUNK_BYTES] for i in range(16)])
        assert many["ok"] and sum(isinstance(x, int) for x in many["slots"]) == 4 and many["over_quota"] == 12
        again = hog.call("reserve", items=[[str(a.object_key(bytes([99]) * 16)), CHUNK_BYTES]])
        assert again["slots"] == [None]  # it holds its quota already
        assert retrieved_exactly(a, toks, kv, slots) == 64  # nothing of the others' was evicted for it
        hog.call("abort", lease=many["lease"])
        assert s.http("GET", "/stats")["leases"] == 0
        hog.close()
    finally:
        s.stop()


def test_oversized_messages_are_dropped_before_they_cost_memory():
    s = ServerProcess().start()
    try:
        before = s.status("VmRSS")
        raw = Raw(s)
        raw.sock.send_multipart([b"x" * (256 << 20)])  # far above the limit for chunk_size 16
        time.sleep(2.0)
        assert s.status("VmRSS") - before < 64 << 10  # kB: the frame was never taken in
        raw.close()
        raw = Raw(s)
        reply = raw.call("op" * 50000)
        assert not reply["ok"] and len(reply["error"]) < 400  # never echoes unbounded input
        assert raw.hello()["ok"]
        raw.close()
    finally:
        s.stop()


def _http_raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(request)
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_bad_http_requests_get_4xx_and_cannot_exhaust_threads():
    s = ServerProcess().start()
    try:
        auth = f"Authorization: Bearer {s.secret()}\r\n".encode()
        neg = _http_raw(s.http_port, b"POST /lookup HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: -1\r\n\r\n{}")
        assert neg.startswith(b"HTTP/1.0 400") or neg.startswith(b"HTTP/1.1 400"), neg[:80]
        body = b"[" * 100000 + b"]" * 100000
        deep = _http_raw(s.http_port, b"POST /lookup HTTP/1.1\r\nHost: x\r\n" + auth
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b" 400 " in deep.split(b"\r\n")[0] and b"nested" in deep
        stalled = []
        for _ in range(100):  # headers promise a body that never comes
            c = socket.create_connection(("127.0.0.1", s.http_port), timeout=5)
            c.sendall(b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            stalled.append(c)
        time.sleep(1.0)
        assert s.status("Threads") < 60  # bounded, not one thread per stalled connection
        deadline = time.monotonic() + 30
        while True:  # served again once the stalled ones time out (10 s)
            try:
                assert s.http("GET", "/health", auth=False)["ok"] is True
                break
            except (OSError, urllib.error.HTTPError):
                assert time.monotonic() < deadline, "the HTTP server never recovered"
                time.sleep(0.5)
        for c in stalled:
            c.close()
        assert s.proc.poll() is None
    finally:
        s.stop()
    assert "Traceback" not in s.output


def test_session_and_model_tables_stay_bounded():
    from lmcache.server.server import MAX_MODELS, MAX_SESSIONS

    s = ServerProcess().start()
    try:
        raw = Raw(s)
        from lmcache.core.geometry import DTYPE_CODES

        g = [GEO.num_layers, GEO.num_kv_heads, GEO.k_dim, GEO.v_dim, DTYPE_CODES[GEO.dtype], GEO.kind]
        for i in range(3000):
            assert raw.call("hello", model=f"m{i}", geometry=g, heads=[0, 2])["ok"]
        stats = s.http("GET", "/stats")
        assert stats["sessions"] <= MAX_SESSIONS
        from lmcache.server.local_auth import ClientLock

        lock = ClientLock()  # one client process saying hello again and again costs the server one open file
        fds = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
        for _ in range(300):
            assert raw.call("hello", model="again", alive=lock.path)["shm_path"]
        assert len(os.listdir(f"/proc/{s.proc.pid}/fd")) - fds <= 2
        lock.close()
        assert len(s.http("GET", "/clients")) <= MAX_SESSIONS
        looked = s.http("POST", "/lookup", {"tokens": prompt(32)})
        assert len(looked["models"]) <= MAX_MODELS
        raw.close()
        e = mp(s.url)  # a real client is still served
        toks = prompt(32, 5)
        kv, slots = store(e, toks, seed=5)
        assert retrieved_exactly(e, toks, kv, slots) == 32
    finally:
        s.stop()


def test_stores_of_cached_chunks_leave_no_lease():
    s = ServerProcess().start()
    try:
        e = mp(s.url)
        toks = prompt(64, 3)
        kv, slots = store(e, toks, seed=3)
        for _ in range(20):
            assert e.store(toks, kv, slots).existing_chunks == 4
        assert s.http("GET", "/stats")["leases"] == 0
    finally:
        s.stop()


# --- 10-13: secrets and auth ---------------------------------------------------------------------------

def test_the_token_can_come_from_a_file_or_the_environment_and_never_shows_in_the_process_list(tmp_path):
    secret_file = tmp_path / "token"
    secret_file.write_text("file-secret\n")
    s = ServerProcess("--token-file", str(secret_file)).start()
    try:
        with open(f"/proc/{s.proc.pid}/cmdline", "rb") as f:
            assert b"file-secret" not in f.read()
        ok = mp(s.url, server_token="file-secret")
        toks = prompt(16)
        store(ok, toks)
        assert ok.lookup(toks) == 16
        with pytest.raises(ProtocolError, match="token"):
            mp(s.url, server_token="file-secret-but-longer").lookup(toks)
    finally:
        s.stop()
    s = ServerProcess(env={"LMCACHE_SERVER_TOKEN": "env-secret"}).start()
    try:
        toks = prompt(16)
        ok = mp(s.url, server_token="env-secret")
        store(ok, toks)
        assert ok.lookup(toks) == 16
    finally:
        s.stop()
    s = ServerProcess("--token", "visible").start()
    assert s.stop() == 0 and "--token is visible to every local user" in s.output


def test_http_endpoints_need_the_secret_where_they_reveal_or_change_the_cache():
    s = ServerProcess("--token", "sesame").start()
    try:
        for method, path in (("GET", "/stats"), ("GET", "/clients"), ("GET", "/metrics"), ("POST", "/lookup"),
                             ("POST", "/clear")):
            with pytest.raises(urllib.error.HTTPError) as e:
                s.http(method, path, {"tokens": [1]} if method == "POST" else None, auth=False)
            assert e.value.code == 401, path
            with pytest.raises(urllib.error.HTTPError) as e:
                s.http(method, path, {"tokens": [1]} if method == "POST" else None, {"Authorization": "Bearer sesamx"})
            assert e.value.code == 401, path
            s.http(method, path, {"tokens": [1]} if method == "POST" else None, {"Authorization": "Bearer sesame"})
        assert s.http("GET", "/health", auth=False)["ok"] is True
    finally:
        s.stop()
    s = ServerProcess().start()  # no token: aggregate counters are open, the rest needs the local secret
    try:
        assert "pool" in s.http("GET", "/stats", auth=False)
        assert "lmcache_pool_bytes" in s.http("GET", "/metrics", auth=False)
        for method, path in (("GET", "/clients"), ("POST", "/lookup"), ("POST", "/clear")):
            with pytest.raises(urllib.error.HTTPError) as e:
                s.http(method, path, {"tokens": [1]} if method == "POST" else None, auth=False)
            assert e.value.code == 401, path
            s.http(method, path, {"tokens": [1]} if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            s.http("GET", "/lookup")
        assert e.value.code == 405
    finally:
        s.stop()


@pytest.mark.parametrize("version", [True, 1.0, 2.0, "2", None])
def test_only_the_integer_protocol_version_is_accepted(version):
    s = ServerProcess().start()
    try:
        raw = Raw(s)
        raw.sock.send(msgspec.msgpack.encode({"v": version, "op": "hello", "id": 3, "token": raw.token}))
        assert raw.sock.poll(5000)
        reply = msgspec.msgpack.decode(raw.sock.recv())
        assert reply["ok"] is False and "protocol version" in reply["error"]
        raw.close()
    finally:
        s.stop()


# --- 14-16: crash hygiene and validation -----------------------------------------------------------

def _segments(port: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"lmcache-{port}-") or f == f"lmcache-{port}.key"]


def _lmcache(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    return subprocess.run([sys.executable, "-m", "lmcache.cli.main", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_failed_starts_leave_no_segment_and_a_restart_reclaims_a_dead_servers():
    from redisutil import free_port

    port = free_port()
    r = _lmcache("server", "--port", str(port), "--http-port", "0", "--cpu-size-gb", "0.05", "--remote-url", "lm://x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and _segments(port) == []
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    r = _lmcache("server", "--port", str(port), "--http-port", str(busy.getsockname()[1]), "--cpu-size-gb", "0.05")
    busy.close()
    assert r.returncode == 2 and "--http-port" in r.stderr and _segments(port) == []

    s = ServerProcess(port=port).start()
    assert len(_segments(port)) == 2  # the pool and the key
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    s.proc = None
    dead = _segments(port)
    assert len(dead) == 2  # a killed server leaves them ...
    s.start()
    try:
        now = _segments(port)
        assert len(now) == 2 and set(now) != set(dead)  # ... and its successor removes them
        second = _lmcache("server", "--port", str(port), "--http-port", "0", "--cpu-size-gb", "0.05")
        assert second.returncode == 2 and "another lmcache server is running on port" in second.stderr
        assert set(_segments(port)) == set(now)  # the live server's segment is untouched
        e = mp(s.url)
        toks = prompt(16, 4)
        kv, slots = store(e, toks, seed=4)
        assert retrieved_exactly(e, toks, kv, slots) == 16
    finally:
        s.stop()
    assert _segments(port) == []


def test_a_refused_commit_is_not_announced_as_stored():
    s = ServerProcess().start()
    try:
        e = mp(s.url)
        copy = e.backend.gather

        def gather_across_a_restart(kv, jobs):
            s.stop()
            s.start()
            copy(kv, jobs)

        e.backend.gather = gather_across_a_restart
        toks = prompt(64, 12)
        from kvutil import slots_for
        from tierutil import source

        result = e.store(toks, source(12), slots_for(64, 1024, 16, True, 12))
        assert result.stored_indices == [] and result.stored_chunks == 0 and result.dropped_chunks == 4
        e.backend.gather = copy
        time.sleep(1.2)
        assert e.lookup(toks) == 0
    finally:
        s.stop()


@pytest.mark.parametrize("flags,complaint", [
    (["--port", "70000"], "--port: 70000 is out of range"),
    (["--http-port", "70000"], "--http-port: 70000 is out of range"),
    (["--lease-timeout", "-5"], "--lease-timeout: -5 must be > 0"),
    (["--lease-timeout", "0"], "--lease-timeout: 0 must be > 0"),
    (["--client-quota-gb", "0"], "--client-quota-gb: 0 must be > 0"),
    (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
])
def test_bad_ports_and_durations_are_one_line_errors(flags, complaint):
    r = _lmcache("server", "--cpu-size-gb", "0.05", *flags)
    assert r.returncode == 2 and complaint in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(("lmcache: error:", "lmcache server: error:")), r.stderr
