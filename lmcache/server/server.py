"""``lmcache server``: one cache daemon, its pool in shared memory, many engine processes as clients.

One thread serves the ZeroMQ socket and owns every mutation of the stack (simple and race-free: the
bytes themselves are moved by the clients, in the shared pool, so each request is short). Leases are
swept on the same thread; the HTTP frontend runs beside it and only reads, except ``POST /clear``.

Invariant: no byte of the pool is handed to a second client while the first may still touch it. A
lease (reserved memory a client writes, or chunks it reads) ends only by its client's commit/release,
or when its client is provably dead (``local_auth``: the kernel dropped its lock); a live client,
however long it stalls, keeps its leases, and its per-client quota bounds what it can hold. Every
message is authenticated (the local secret or the token), a session is bound to the ZeroMQ connection
that opened it, and lease ids are random, so no client can end or use another's lease.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from lmcache import __version__
from lmcache.core import key_chain
from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, byte_view, check_header
from lmcache.core.config import LMCacheConfig
from lmcache.core.geometry import CODE_DTYPES, KVGeometry, ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.plugins import get_registry
from lmcache.core.store import EXISTS
from lmcache.core.tiers.stack import TierStack
from lmcache.server import local_auth
from lmcache.server.local_auth import LivenessProbe, ServerKey, tokens_equal
from lmcache.server.protocol import OPS, PROTOCOL_VERSION, ProtocolError, decode, encode, short
from lmcache.server.protocol import field as need
from lmcache.server.shm import SharedBuffer

log = logging.getLogger("lmcache")
MAX_KEYS = 1 << 16
EVICTION_LOG = 1 << 16  # evictions kept for engines that poll them (a few MiB at most)
MAX_SESSIONS = 512  # sessions at once (engine processes: a few per GPU); beyond, the longest idle is forgotten
MAX_MODELS = 64  # model identities remembered for HTTP /lookup (most recent hello wins)
SESSION_IDLE_S = 600.0  # a session with no lease and no request for this long is forgotten
PER_TOKEN_BYTES = 512 << 10  # the largest KV row of one token (a 405B-class model in bf16): sizes message limits


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Session:
    id: str
    model: str
    #: the ZeroMQ routing id of the connection that said hello: only it may use the session
    peer: bytes
    started: float
    last_seen: float
    requests: int = 0
    #: the client's process id as it says (shown, never trusted)
    pid: int | None = None
    #: the client's liveness lock; None for a client that cannot share this host's /dev/shm (it gets no
    #: pool mapping, so it never holds memory it could touch behind the server's back)
    probe: LivenessProbe | None = None
    #: pool bytes its leases hold (reserved + being read): bounded by the per-client quota
    held: int = 0
    seq: int = 0  # a number to show instead of the session id (a capability)


@dataclass
class Lease:
    session: str
    expires: float
    objs: dict[int, tuple[ObjectKey, MemoryObj]] = field(default_factory=dict)  # reserve: offset -> (key, obj)
    entries: list[Any] = field(default_factory=list)  # acquire: CpuEntry with a reader's reference
    nbytes: int = 0  # counted in the session's ``held``
    stalled: bool = False  # past its timeout, client alive: kept (logged once)


class CacheServer:
    """The daemon: one pool (shared memory) and its tiers, many engine clients (see the module docstring
    for the invariant on leases). Lock rule: ``lock`` is held while one request is handled and by HTTP
    writers; the ZeroMQ socket is used by the serving thread only.
    """

    def __init__(self, config: LMCacheConfig, host: str = "127.0.0.1", port: int = 5555, token: str = "",
                 allow_remote: bool = False, lease_timeout_s: float = 30.0, client_quota_bytes: int | None = None,
                 max_message_bytes: int | None = None) -> None:
        if not is_loopback(host) and not (allow_remote and token):
            raise ValueError(f"--host {host} is not loopback: also pass --allow-remote and --token SECRET "
                             "(clients must present the token); or keep --host 127.0.0.1")
        if not 0 < port < 65536:
            raise ValueError(f"--port {port}: must be 1..65535")
        if not 0 < lease_timeout_s <= 86400:
            raise ValueError(f"--lease-timeout {lease_timeout_s}: must be > 0 and at most 86400 seconds")
        self.config = config
        key_chain.configure(config.native_keys)  # the lookup endpoint hashes prompts
        self.host, self.port, self.token = host, port, token
        self.lease_timeout_s = lease_timeout_s
        self.instance = secrets.token_hex(8)
        capacity = int(config.max_cpu_size_gb * 2**30)
        # the port's key: proves a dead predecessor (its leftovers are ours to remove) and holds the local secret
        self.key = ServerKey.claim(port)
        try:
            for path in local_auth.stale_segments(port):
                log.warning("lmcache server: removing %s, left by a server on port %d that died", path, port)
                os.unlink(path)
            for path in local_auth.stale_client_locks():
                try:
                    os.unlink(path)
                except OSError:
                    pass  # another user's leftover
            self.client_quota = client_quota_bytes if client_quota_bytes is not None else capacity * 3 // 4
            if self.client_quota <= 0:
                raise ValueError(f"--client-quota-gb {self.client_quota / 2**30:g}: must be > 0")
            self.shm = SharedBuffer.create(capacity, tag=f"{port}-")
        except BaseException:
            self.key.release()
            raise
        try:  # a start that fails (a bad remote URL, ...) leaves no segment behind
            self.stack = TierStack(config, self.shm.tensor, pinned=False, registry=get_registry())
        except BaseException:
            self.shm.close()
            self.key.release()
            raise
        self.max_message = max_message_bytes or config.chunk_size * PER_TOKEN_BYTES + (1 << 20)
        self.sessions: dict[str, Session] = {}
        self._session_seq = 0
        self.models: dict[str, tuple[ChunkHasher, tuple[int, int]]] = {}
        self.leases: dict[int, Lease] = {}
        self.counters = {"requests": 0, "errors": 0, "bad_messages": 0, "expired_leases": 0, "refused_clients": 0,
                         "quota_refusals": 0}
        self._observers: list = []  # callbacks (op, seconds), e.g. the metrics histograms
        # chunks that left the CPU tier, newest last, for engines that announce evictions (KV events)
        self._evicted: deque[tuple[int, str, str | None]] = deque(maxlen=EVICTION_LOG)
        self._evicted_seq = 0
        self._evicted_lock = threading.Lock()
        self.stack.eviction_listeners.append(self._on_evict)
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # a frame larger than any legitimate request (one chunk's payload in byte mode) drops the peer before
        # the server allocates it
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close(0)
            self.stack.close()
            self.shm.close()  # no segment left behind by a server that never started
            self.key.release()
            raise OSError(str(e)) from None
        self.lock = threading.RLock()  # held while handling; HTTP writers take it too
        self._next_sweep = 0.0

    # -- loop ---------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self._serve_one(frames)
            self._sweep()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        with self.lock:
            for lease in list(self.leases.values()):
                self._drop_lease(lease)
            self.leases.clear()
            for s in self.sessions.values():
                if s.probe is not None:
                    s.probe.close(unlink=False)
            self.stack.close()  # flushes the write-back queues (the disk tier keeps what was stored)
        self._sock.close(0)
        self.shm.close()
        self.key.release()

    def authentic(self, token: object) -> bool:
        """The local secret (a client of this user) or the configured token."""
        return tokens_equal(token, self.key.secret) or tokens_equal(token, self.token)

    def _serve_one(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        t0 = time.perf_counter()
        op = "invalid"
        rid = 0
        out: list[bytes] = []
        try:
            if not body:
                raise ProtocolError("empty message")
            msg = decode(body[0])
            rid = msg.get("id", 0) if isinstance(msg.get("id", 0), int) else 0
            version = msg.get("v")
            if type(version) is not int or version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {short(version)} is not supported: this server ({__version__}) "
                                    f"speaks version {PROTOCOL_VERSION}; run matching lmcache versions on engines and server")
            op = msg.get("op")
            if op not in OPS:
                op = "invalid"
                raise ProtocolError(f"unknown op {short(msg.get('op'))}: known ops are {', '.join(OPS)}")
            if not self.authentic(msg.get("token")):
                self.counters["refused_clients"] += 1
                raise ProtocolError(
                    "missing or wrong token: this server admits clients of its own user (uid "
                    f"{os.geteuid()}), which read {self.key.path}, and clients presenting its --token; run the engine "
                    "as that user, or set server_token (LMCACHE_SERVER_TOKEN) to the server's token")
            with self.lock:
                self.counters["requests"] += 1
                reply, out = getattr(self, f"_op_{op}")(msg, body[1:], identity)
            reply["ok"] = True
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # never let one request take the server down
            self.counters["errors"] += 1
            log.exception("lmcache server: %s failed", op)
            reply = {"ok": False, "error": f"internal error in {op}: {type(e).__name__}: {e}"}
        reply.update(v=PROTOCOL_VERSION, id=rid, server=self.instance)
        try:
            self._sock.send_multipart([identity, encode(reply), *out], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone
        for observe in self._observers:
            observe(str(op), time.perf_counter() - t0)

    # -- helpers ------------------------------------------------------------------------------------

    def _session(self, msg: dict, identity: bytes) -> Session:
        sid = msg.get("session")
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        # a session is usable only from the connection that opened it: knowing its id is not enough
        if s is None or not secrets.compare_digest(s.peer, identity):
            raise ProtocolError("unknown session: send hello first")
        s.last_seen = time.time()
        s.requests += 1
        return s

    @staticmethod
    def _keys(msg: dict, name: str = "keys") -> list[ObjectKey]:
        raw = need(msg, name, list)
        if len(raw) > MAX_KEYS:
            raise ProtocolError(f"too many keys ({len(raw)} > {MAX_KEYS})")
        try:
            return [ObjectKey.parse(k) for k in raw]
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError(f"field '{name}' holds a malformed key") from None

    def _new_lease(self, session: Session, nbytes: int) -> tuple[int, Lease]:
        lease = Lease(session.id, time.monotonic() + self.lease_timeout_s, nbytes=nbytes)
        lid = secrets.randbits(62) + 1  # random: a lease id is not guessable from another's
        while lid in self.leases:
            lid = secrets.randbits(62) + 1
        self.leases[lid] = lease
        session.held += nbytes
        return lid, lease

    def _take_lease(self, msg: dict, session: Session) -> Lease:
        lid = need(msg, "lease", int)
        lease = self.leases.get(lid)
        if lease is None or lease.session != session.id:
            raise ProtocolError(f"unknown or expired lease {short(lid)}")
        del self.leases[lid]
        return lease

    def _drop_lease(self, lease: Lease) -> None:
        self.stack.abort(obj for _, obj in lease.objs.values())
        self.stack.release_many(lease.entries)
        session = self.sessions.get(lease.session)
        if session is not None:
            session.held -= lease.nbytes

    def _sweep(self) -> None:
        """Release the leases of dead clients; keep a live client's (see the module docstring); forget
        dead and idle sessions."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.lease_timeout_s / 4)
        with self.lock:
            dead = {sid for sid, s in self.sessions.items() if s.probe is not None and not s.probe.alive()}
            for lid, lease in list(self.leases.items()):
                if lease.expires >= now and lease.session not in dead:
                    continue
                session = self.sessions.get(lease.session)
                if session is not None and session.probe is not None and lease.session not in dead:
                    lease.expires = now + self.lease_timeout_s  # slow, stopped or frozen: not dead
                    if not lease.stalled:
                        lease.stalled = True
                        log.warning("lmcache server: client %s (pid %s) holds a lease past %.0fs; its %d bytes stay its "
                                    "own until it finishes or dies", session.seq, session.pid, self.lease_timeout_s,
                                    lease.nbytes)
                    continue
                del self.leases[lid]
                self._drop_lease(lease)
                self.counters["expired_leases"] += 1
                log.warning("lmcache server: lease of client %s released (client %s)",
                            session.seq if session else "?", "gone" if lease.session in dead or session is None
                            else "silent past the lease timeout")
            wall = time.time()
            busy = {lease.session for lease in self.leases.values()}
            for sid in list(self.sessions):
                s = self.sessions[sid]
                if sid in dead or (sid not in busy and wall - s.last_seen > SESSION_IDLE_S):
                    self._forget(sid)

    def _forget(self, sid: str) -> None:
        s = self.sessions.pop(sid)
        if s.probe is not None and not any(o.probe is s.probe for o in self.sessions.values()):
            s.probe.close(unlink=not s.probe.alive())  # the last session of that client process

    def _probe(self, path: object) -> LivenessProbe | None:
        """One probe (one open file) per client process, however many sessions it opens: a server's file
        descriptors are bounded, and a client saying hello again must not cost another."""
        for s in self.sessions.values():
            if s.probe is not None and s.probe.path == path and s.probe.alive():
                return s.probe
        return LivenessProbe.open(path)

    def _check_header(self, raw: Any, key: ObjectKey) -> ChunkHeader:
        if not isinstance(raw, bytes) or len(raw) != HEADER_BYTES:
            raise ProtocolError("header must be the packed chunk header")
        try:
            return check_header(raw, key)
        except ChunkCorrupt as e:
            raise ProtocolError(f"bad chunk header: {e}") from None

    # -- ops ----------------------------------------------------------------------------------------

    def _op_hello(self, msg, frames, identity):
        model = msg.get("model") if isinstance(msg.get("model"), str) else "?"
        model = model[:256]
        geo, heads = msg.get("geometry"), msg.get("heads")
        if isinstance(geo, list) and len(geo) == 6 and isinstance(heads, list) and len(heads) == 2:
            try:  # remembered so that HTTP /lookup can hash tokens the way this model's engines do
                geometry = KVGeometry(geo[0], geo[1], geo[2], geo[3], CODE_DTYPES[geo[4]], geo[5])
                entry = (ChunkHasher(ModelIdentity(model, geometry), self.config.chunk_size), tuple(heads))
            except (KeyError, ValueError, TypeError) as e:
                raise ProtocolError(f"bad model geometry: {short(str(e))}") from None
            self.models.pop(model, None)
            self.models[model] = entry  # newest last
            while len(self.models) > MAX_MODELS:
                self.models.pop(next(iter(self.models)))
        if len(self.sessions) >= MAX_SESSIONS:
            self._next_sweep = 0.0
            self._sweep()
        if len(self.sessions) >= MAX_SESSIONS:  # forget the longest-idle session holding nothing (it says hello again)
            busy = {lease.session for lease in self.leases.values()}
            idle = [s for s in self.sessions.values() if s.id not in busy]
            if not idle:
                raise ProtocolError(f"too many clients holding leases ({MAX_SESSIONS}); retry later")
            self._forget(min(idle, key=lambda s: s.last_seen).id)
        sid = secrets.token_hex(16)
        now = time.time()
        pid = msg.get("pid") if type(msg.get("pid")) is int else None
        probe = self._probe(msg.get("alive"))
        self._session_seq += 1
        self.sessions[sid] = Session(sid, model, identity, now, now, pid=pid, probe=probe, seq=self._session_seq)
        # only a client whose liveness this server can see may map the pool: memory it can touch is never
        # given to anyone else while it lives
        return {"session": sid, "shm_path": self.shm.path if probe is not None else None, "shm_size": self.shm.size,
                "chunk_size": self.config.chunk_size, "server_version": __version__,
                "quota": self.client_quota, "max_message": self.max_message}, []

    def _op_lookup(self, msg, frames, identity):
        self._session(msg, identity)
        return {"tiers": self.stack.lookup_tiers(self._keys(msg))}, []

    def _op_reserve(self, msg, frames, identity):
        session = self._session(msg, identity)
        items = need(msg, "items", list)
        if len(items) > MAX_KEYS:
            raise ProtocolError("too many items")
        parsed = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and type(item[1]) is int
                    and 0 < item[1] <= self.shm.size):
                raise ProtocolError("items must be [key, nbytes] with 0 < nbytes <= the pool size")
            try:
                parsed.append((ObjectKey.parse(item[0]), item[1]))
            except (ValueError, TypeError):
                raise ProtocolError("malformed key in items") from None
        if session.probe is None:  # a client that cannot map the pool learns what to send with put
            return {"slots": ["exists" if self.stack.cpu.contains(k) else "put" for k, _ in parsed], "lease": 0}, []
        biggest = max((n for _, n in parsed), default=0)
        if biggest > self.client_quota:
            self.counters["quota_refusals"] += 1
            raise ProtocolError(f"one chunk of {biggest} bytes exceeds the per-client quota of {self.client_quota} "
                                "bytes: raise lmcache server --client-quota-gb (or --cpu-size-gb)")
        # beyond what this client may hold at once, the rest of the request is dropped (never evicted for)
        room = self.client_quota - session.held
        allowed = 0
        while allowed < len(parsed) and parsed[allowed][1] <= room:
            room -= parsed[allowed][1]
            allowed += 1
        if allowed < len(parsed):
            self.counters["quota_refusals"] += 1
        slots = self.stack.reserve_many(parsed[:allowed]) + [None] * (len(parsed) - allowed)
        held = [(key, slot) for (key, _), slot in zip(parsed, slots) if slot is not EXISTS and slot is not None]
        out: list[Any] = []
        lid = 0
        if held:  # a store that reserves nothing (all cached) needs no lease
            lid, lease = self._new_lease(session, sum(slot.size for _, slot in held))
            for key, slot in held:
                lease.objs[slot.offset] = (key, slot)
        for slot in slots:
            out.append("exists" if slot is EXISTS else None if slot is None else slot.offset)
        return {"slots": out, "lease": lid, "over_quota": len(parsed) - allowed}, []

    def _op_commit(self, msg, frames, identity):
        session = self._session(msg, identity)
        lease = self._take_lease(msg, session)
        ready = []
        try:
            for item in need(msg, "items", list):
                if not (isinstance(item, list) and len(item) == 3 and type(item[2]) is int):
                    raise ProtocolError("items must be [key, header, offset]")
                key_s, raw_header, offset = item
                held = lease.objs.get(offset)
                if held is None or str(held[0]) != key_s:
                    raise ProtocolError(f"offset {short(offset)} was not reserved for key {short(key_s)} in this lease")
                header = self._check_header(raw_header, held[0])
                if header.payload_nbytes != held[1].nbytes:
                    raise ProtocolError("header payload size differs from the reservation")
                ready.append((held[0], header, held[1]))
                del lease.objs[offset]
        except ProtocolError:
            self._drop_lease(lease)
            self.stack.abort(obj for _, _, obj in ready)
            raise
        self._drop_lease(lease)  # reservations the client did not commit
        return {"stored": self.stack.commit_many(ready).stored}, []

    def _op_abort(self, msg, frames, identity):
        self._drop_lease(self._take_lease(msg, self._session(msg, identity)))
        return {}, []

    def _op_acquire(self, msg, frames, identity):
        session = self._session(msg, identity)
        if session.probe is None:
            raise ProtocolError("this client cannot map the pool (no liveness lock in /dev/shm): use get")
        entries = self.stack.acquire_prefix(self._keys(msg))
        # a reader may hold at most its quota: a longer prefix is served in part (a shorter hit, never wrong)
        room, keep = self.client_quota - session.held, 0
        while keep < len(entries) and entries[keep].obj.size <= room:
            room -= entries[keep].obj.size
            keep += 1
        if keep < len(entries):
            self.counters["quota_refusals"] += 1
            self.stack.release_many(entries[keep:])
            entries = entries[:keep]
        items = []
        for e in entries:
            if e.obj.pool is not self.stack.cpu.pool:  # cannot happen: lower-tier loads land in the pool
                self.stack.release_many(entries)
                raise ProtocolError("internal: entry outside the shared pool")
            items.append([e.obj.offset, e.header.pack()])
        lid = 0
        if entries:
            lid, lease = self._new_lease(session, sum(e.obj.size for e in entries))
            lease.entries = entries
        return {"items": items, "lease": lid}, []

    def _op_release(self, msg, frames, identity):
        # the reader's fence: "ok" proves its lease held until now, so the bytes it copied were the chunk's
        self._drop_lease(self._take_lease(msg, self._session(msg, identity)))
        return {}, []

    def _op_put(self, msg, frames, identity):
        self._session(msg, identity)
        key = self._keys({"keys": [need(msg, "key", str)]})[0]
        header = self._check_header(msg.get("header"), key)
        if len(frames) != 1 or len(frames[0]) != header.payload_nbytes:
            raise ProtocolError("put needs exactly one payload frame of the header's payload size")
        slot = self.stack.reserve_many([(key, header.payload_nbytes)])[0]
        if slot is EXISTS or slot is None:
            return {"stored": 0}, []
        byte_view(slot.raw)[:] = frames[0]
        return {"stored": self.stack.commit_many([(key, header, slot)]).stored}, []

    def _op_get(self, msg, frames, identity):
        self._session(msg, identity)
        entries = self.stack.acquire_prefix(self._keys(msg))
        try:
            headers, payloads, room = [], [], self.client_quota
            for e in entries:  # one reply holds at most a quota's worth of bytes
                room -= e.obj.size
                if room < 0:
                    break
                headers.append(e.header.pack())
                payloads.append(bytes(byte_view(e.obj.raw)))
        finally:
            self.stack.release_many(entries)
        return {"headers": headers}, payloads

    def _op_prefetch(self, msg, frames, identity):
        self._session(msg, identity)
        return {"cpu": self.stack.prefetch(self._keys(msg))}, []

    def _on_evict(self, okey, where: str | None) -> None:
        with self._evicted_lock:  # called by whichever thread made room in the CPU tier
            self._evicted_seq += 1
            self._evicted.append((self._evicted_seq, str(okey), where))

    def _op_evicted(self, msg, frames, identity):
        self._session(msg, identity)
        since = need(msg, "since", int)
        with self._evicted_lock:
            if since < 0:  # a new reader: from now on
                return {"records": [], "next": self._evicted_seq, "lost": False}, []
            records = [list(r) for r in self._evicted if r[0] > since]
            oldest = self._evicted[0][0] if self._evicted else self._evicted_seq + 1
            # a reader further behind than the log reaches has missed some evictions
            return {"records": records, "next": self._evicted_seq, "lost": since + 1 < oldest}, []

    def _op_stats(self, msg, frames, identity):
        self._session(msg, identity)
        return self.stats(), []

    def _op_clear(self, msg, frames, identity):
        self._session(msg, identity)
        return {"cleared": self.stack.clear()}, []

    # -- read by HTTP -------------------------------------------------------------------------------

    def stats(self) -> dict:
        pool = self.stack.cpu.pool.stats()
        return {"tiers": self.stack.tier_stats(), "pool": pool, "chunks": len(self.stack.cpu),
                "leases": len(self.leases), "stalled_leases": sum(lease.stalled for lease in self.leases.values()),
                "clients": len(self.active_sessions()), "sessions": len(self.sessions), "server": dict(self.counters),
                "client_quota": self.client_quota, "tier_problems": list(self.stack.tier_problems),
                "queues": self.stack.queue_depths()}

    def active_sessions(self, window_s: float = 60.0) -> list[Session]:
        now = time.time()
        return [s for s in list(self.sessions.values()) if now - s.last_seen <= window_s]

    def client_rows(self) -> list[dict]:
        """What ``GET /clients`` shows: never a session id or a connection id (they are capabilities)."""
        def iso(t: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        return [{"client": s.seq, "model": s.model, "pid": s.pid, "maps_pool": s.probe is not None,
                 "started": iso(s.started), "last_seen": iso(s.last_seen), "idle_s": round(time.time() - s.last_seen, 1),
                 "requests": s.requests, "held_bytes": s.held} for s in self.active_sessions()]
