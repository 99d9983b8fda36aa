"""``lmcache server``: one cache daemon, its pool in shared memory, many engine processes as clients.

One thread serves the ZeroMQ socket and owns every mutation of the stack (simple and race-free: the
bytes themselves are moved by the clients, in the shared pool, so each request is short). Leases are
swept on the same thread; the HTTP frontend runs beside it and only reads, except ``POST /clear``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from lmcache import __version__
from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, byte_view
from lmcache.core.config import LMCacheConfig
from lmcache.core.geometry import CODE_DTYPES, KVGeometry, ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.plugins import get_registry
from lmcache.core.tiers.stack import EXISTS, TierStack
from lmcache.server.protocol import OPS, PROTOCOL_VERSION, ProtocolError, decode, encode, field as need
from lmcache.server.shm import SharedBuffer

log = logging.getLogger("lmcache")
MAX_KEYS = 1 << 16
EVICTION_LOG = 1 << 16  # evictions kept for engines that poll them (a few MiB at most)
# A lease whose client process is still alive is extended, up to this many lease timeouts: memory a live
# client may still write or read is not handed to anyone else while it can still use it.
HARD_LEASE_FACTOR = 10  # per request: a 16M-token prompt at chunk 256; more is an error, not a hang


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return os.path.exists(f"/proc/{pid}") and _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
    peer: str
    started: float
    last_seen: float
    requests: int = 0
    #: the client's process id when it runs on this host (it maps the pool): lets the server tell a slow
    #: client from a dead one before reusing memory the client may still touch
    pid: int | None = None


@dataclass
class Lease:
    session: str
    expires: float
    hard_deadline: float = 0.0
    objs: dict[int, tuple[ObjectKey, MemoryObj]] = field(default_factory=dict)  # reserve: offset -> (key, obj)
    entries: list[Any] = field(default_factory=list)  # acquire: CpuEntry with a reader's reference


class CacheServer:
    def __init__(self, config: LMCacheConfig, host: str = "127.0.0.1", port: int = 5555, token: str = "",
                 allow_remote: bool = False, lease_timeout_s: float = 30.0) -> None:
        if not is_loopback(host) and not (allow_remote and token):
            raise ValueError(f"--host {host} is not loopback: also pass --allow-remote and --token SECRET "
                             "(clients must present the token); or keep --host 127.0.0.1")
        self.config = config
        self.host, self.port, self.token = host, port, token
        self.lease_timeout_s = lease_timeout_s
        self.instance = secrets.token_hex(8)
        capacity = int(config.max_cpu_size_gb * 2**30)
        self.shm = SharedBuffer.create(capacity, tag=f"{port}-")
        self.stack = TierStack(config, self.shm.tensor, pinned=False, registry=get_registry())
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, tuple[ChunkHasher, tuple[int, int]]] = {}
        self.leases: dict[int, Lease] = {}
        self._next_lease = 1
        self.counters = {"requests": 0, "errors": 0, "bad_messages": 0, "expired_leases": 0}
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
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close(0)
            self.stack.close()
            self.shm.close()  # no segment left behind by a server that never started
            raise OSError(str(e)) from None
        self.lock = threading.RLock()  # held while handling; HTTP writers take it too

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
            self.stack.close()  # flushes the write-back queues (the disk tier keeps what was stored)
        self._sock.close(0)
        self.shm.close()

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
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {version!r} is not supported: this server ({__version__}) speaks "
                                    f"version {PROTOCOL_VERSION}; run matching lmcache versions on engines and server")
            op = msg.get("op")
            if op not in OPS:
                raise ProtocolError(f"unknown op {op!r}: known ops are {', '.join(OPS)}")
            if self.token and msg.get("token") != self.token:
                raise ProtocolError("missing or wrong token: set server_token to the server's --token")
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

    def _session(self, msg: dict) -> Session:
        sid = msg.get("session")
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
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

    def _new_lease(self, session: Session) -> Lease:
        now = time.monotonic()
        lease = Lease(session.id, now + self.lease_timeout_s, now + HARD_LEASE_FACTOR * self.lease_timeout_s)
        self.leases[self._next_lease] = lease
        self._next_lease += 1
        return lease

    def _take_lease(self, msg: dict, session: Session) -> Lease:
        lid = need(msg, "lease", int)
        lease = self.leases.get(lid)
        if lease is None or lease.session != session.id:
            raise ProtocolError(f"unknown or expired lease {lid}")
        del self.leases[lid]
        return lease

    def _drop_lease(self, lease: Lease) -> None:
        self.stack.abort(obj for _, obj in lease.objs.values())
        self.stack.release_many(lease.entries)

    def _sweep(self) -> None:
        now = time.monotonic()
        expired = [lid for lid, lease in self.leases.items() if lease.expires < now]
        if not expired:
            return
        with self.lock:
            for lid in expired:
                lease = self.leases.get(lid)
                if lease is None:
                    continue
                session = self.sessions.get(lease.session)
                if session is not None and _alive(session.pid) and now < lease.hard_deadline:
                    lease.expires = min(now + self.lease_timeout_s, lease.hard_deadline)  # slow, not dead
                    continue
                del self.leases[lid]
                self._drop_lease(lease)
                self.counters["expired_leases"] += 1
                log.warning("lmcache server: lease %d of session %s expired (client %s); its memory is released",
                            lid, lease.session, "stalled too long" if session and _alive(session.pid) else "gone")

    def _check_header(self, raw: Any, key: ObjectKey) -> ChunkHeader:
        if not isinstance(raw, bytes) or len(raw) != HEADER_BYTES:
            raise ProtocolError("header must be the packed chunk header")
        try:
            header = ChunkHeader.unpack(raw)
        except ChunkCorrupt as e:
            raise ProtocolError(f"bad chunk header: {e}") from None
        if (header.chunk_key, header.head_start, header.head_end) != (key.chunk, key.head_start, key.head_end):
            raise ProtocolError("header does not match its key")
        if header.payload_nbytes != header.expected_nbytes():
            raise ProtocolError("header size fields disagree")
        return header

    # -- ops ----------------------------------------------------------------------------------------

    def _op_hello(self, msg, frames, identity):
        model = msg.get("model") if isinstance(msg.get("model"), str) else "?"
        geo, heads = msg.get("geometry"), msg.get("heads")
        if isinstance(geo, list) and len(geo) == 6 and isinstance(heads, list) and len(heads) == 2 and model not in self.models:
            try:  # remembered so that HTTP /lookup can hash tokens the way this model's engines do
                geometry = KVGeometry(geo[0], geo[1], geo[2], geo[3], CODE_DTYPES[geo[4]], geo[5])
                self.models[model] = (ChunkHasher(ModelIdentity(model, geometry), self.config.chunk_size), tuple(heads))
            except (KeyError, ValueError, TypeError) as e:
                raise ProtocolError(f"bad model geometry: {e}") from None
        sid = secrets.token_hex(8)
        now = time.time()
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) and msg.get("host") == socket.gethostname() else None
        self.sessions[sid] = Session(sid, model, identity.hex(), now, now, pid=pid)
        return {"session": sid, "shm_path": self.shm.path, "shm_size": self.shm.size, "chunk_size": self.config.chunk_size,
                "server_version": __version__}, []

    def _op_lookup(self, msg, frames, identity):
        self._session(msg)
        return {"tiers": self.stack.lookup_tiers(self._keys(msg))}, []

    def _op_reserve(self, msg, frames, identity):
        session = self._session(msg)
        items = need(msg, "items", list)
        if len(items) > MAX_KEYS:
            raise ProtocolError("too many items")
        parsed = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)
                    and 0 < item[1] <= self.shm.size):
                raise ProtocolError("items must be [key, nbytes] with 0 < nbytes <= the pool size")
            try:
                parsed.append((ObjectKey.parse(item[0]), item[1]))
            except (ValueError, TypeError):
                raise ProtocolError("malformed key in items") from None
        slots = self.stack.reserve_many(parsed)
        lease = self._new_lease(session)
        out = []
        for (key, _), slot in zip(parsed, slots):
            if slot is EXISTS:
                out.append("exists")
            elif slot is None:
                out.append(None)
            else:
                lease.objs[slot.offset] = (key, slot)
                out.append(slot.offset)
        return {"slots": out, "lease": self._next_lease - 1}, []

    def _op_commit(self, msg, frames, identity):
        session = self._session(msg)
        lease = self._take_lease(msg, session)
        try:
            ready = []
            for item in need(msg, "items", list):
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], int)):
                    raise ProtocolError("items must be [key, header, offset]")
                key_s, raw_header, offset = item
                held = lease.objs.get(offset)
                if held is None or str(held[0]) != key_s:
                    raise ProtocolError(f"offset {offset} was not reserved for key {key_s!r} in this lease")
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
        return {"stored": self.stack.commit_many(ready)}, []

    def _op_abort(self, msg, frames, identity):
        self._drop_lease(self._take_lease(msg, self._session(msg)))
        return {}, []

    def _op_acquire(self, msg, frames, identity):
        session = self._session(msg)
        entries = self.stack.acquire_prefix(self._keys(msg))
        lease = self._new_lease(session)
        lease.entries = entries
        items = []
        for e in entries:
            if e.obj.pool is not self.stack.cpu.pool:  # cannot happen: lower-tier loads land in the pool
                raise ProtocolError("internal: entry outside the shared pool")
            items.append([e.obj.offset, e.header.pack()])
        return {"items": items, "lease": self._next_lease - 1}, []

    def _op_release(self, msg, frames, identity):
        self._drop_lease(self._take_lease(msg, self._session(msg)))
        return {}, []

    def _op_put(self, msg, frames, identity):
        self._session(msg)
        key = self._keys({"keys": [need(msg, "key", str)]})[0]
        header = self._check_header(msg.get("header"), key)
        if len(frames) != 1 or len(frames[0]) != header.payload_nbytes:
            raise ProtocolError("put needs exactly one payload frame of the header's payload size")
        slot = self.stack.reserve_many([(key, header.payload_nbytes)])[0]
        if slot is EXISTS or slot is None:
            return {"stored": 0}, []
        byte_view(slot.raw)[:] = frames[0]
        return {"stored": self.stack.commit_many([(key, header, slot)])}, []

    def _op_get(self, msg, frames, identity):
        self._session(msg)
        entries = self.stack.acquire_prefix(self._keys(msg))
        try:
            headers = [e.header.pack() for e in entries]
            payloads = [bytes(byte_view(e.obj.raw)) for e in entries]
        finally:
            self.stack.release_many(entries)
        return {"headers": headers}, payloads

    def _op_prefetch(self, msg, frames, identity):
        self._session(msg)
        return {"cpu": self.stack.prefetch(self._keys(msg))}, []

    def _on_evict(self, okey, where: str | None) -> None:
        with self._evicted_lock:  # called by whichever thread made room in the CPU tier
            self._evicted_seq += 1
            self._evicted.append((self._evicted_seq, str(okey), where))

    def _op_evicted(self, msg, frames, identity):
        self._session(msg)
        since = need(msg, "since", int)
        with self._evicted_lock:
            if since < 0:  # a new reader: from now on
                return {"records": [], "next": self._evicted_seq, "lost": False}, []
            records = [list(r) for r in self._evicted if r[0] > since]
            oldest = self._evicted[0][0] if self._evicted else self._evicted_seq + 1
            # a reader further behind than the log reaches has missed some evictions
            return {"records": records, "next": self._evicted_seq, "lost": since + 1 < oldest}, []

    def _op_stats(self, msg, frames, identity):
        self._session(msg)
        return self.stats(), []

    def _op_clear(self, msg, frames, identity):
        self._session(msg)
        return {"cleared": self.stack.clear()}, []

    # -- read by HTTP -------------------------------------------------------------------------------

    def stats(self) -> dict:
        pool = self.stack.cpu.pool.stats()
        return {"tiers": self.stack.tier_stats(), "pool": pool, "chunks": len(self.stack.cpu),
                "leases": len(self.leases), "clients": len(self.active_sessions()), "server": dict(self.counters),
                "queues": {n: wb._queue.qsize() for n, wb in self.stack.writeback.items()}}

    def active_sessions(self, window_s: float = 60.0) -> list[Session]:
        now = time.time()
        return [s for s in self.sessions.values() if now - s.last_seen <= window_s]
