"""The engine side of MP mode: the same batched interface as ``TierStack``, served by ``lmcache server``.

Failure policy, as for every remote thing: a server that is down, restarting or slow makes lookups miss
and stores drop (counted in ``stats``); no call waits longer than ``remote_timeout_s``; after a failure
the client stays quiet for a second, then reconnects and says hello again by itself. A server restart
is noticed by its instance id: the old mapping is dropped and the new pool mapped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import torch
import zmq

from lmcache.core.chunk_format import ChunkHeader, byte_view
from lmcache.core.config import LMCacheConfig
from lmcache.core.geometry import DTYPE_CODES, ModelIdentity
from lmcache.core.hookspecs import hookimpl
from lmcache.core.keys import ObjectKey
from lmcache.core.store import (
    EXISTS,
    ChunkStoreSpec,
    Committed,
    EvictionListener,
    Readable,
    Reservation,
    ReserveAnswer,
    StoreRequest,
)
from lmcache.core.tiers.stats import TierStats
from lmcache.server.local_auth import ClientLock, read_local_secret
from lmcache.server.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode
from lmcache.server.shm import SharedBuffer

log = logging.getLogger("lmcache")


@dataclass(eq=False)
class Slot:
    """Room for one chunk: in the shared pool (offset) or, in byte mode, a private tensor."""

    key: ObjectKey
    nbytes: int
    lease: int
    offset: int
    raw: torch.Tensor

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.raw.view(dtype).view(shape)


@dataclass(eq=False)
class Entry:
    header: ChunkHeader
    lease: int
    raw: torch.Tensor

    def payload(self) -> torch.Tensor:
        return self.raw.view(self.header.dtype).view(self.header.payload_shape)


class ServerStack:
    """The mp-mode ``ChunkStore`` (``lmcache.core.store``): the pool and its tiers live in ``lmcache server``;
    this process maps the pool and moves bytes itself, so only offsets cross the socket.

    Invariants: every reservation and every read is a server lease, held until commit/abort/release or this
    process's death (the server sees it through this process's liveness lock); a reply from another server
    instance than the one whose pool is mapped is never trusted. Lock rule: one request at a time per
    process (``_lock``), so a DEALER socket never interleaves two requests' replies.
    """

    def __init__(self, config: LMCacheConfig, identity: ModelIdentity, head_range: tuple[int, int]) -> None:
        self.config = config
        self.identity = identity
        self.head_range = head_range
        self.url = config.server_url
        self.timeout_ms = int(config.remote_timeout_s * 1000)
        self.retry_interval_s = 1.0
        self.stats = TierStats()
        self.name = "server"
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._session: str | None = None
        self._instance: str | None = None
        self._shm: SharedBuffer | None = None
        self._bytes_mode = config.mp_transport == "bytes"
        self._down_until = 0.0
        self._down_logged = False
        self._next_id = 1
        self._lock = threading.RLock()
        #: called (key, "disk" | None) for chunks that left the server's CPU tier; fed by poll_evictions
        self.eviction_listeners: list[EvictionListener] = []
        self._evicted_cursor = -1
        self._alive: ClientLock | None = None
        self._quota_logged = False
        self._token = config.server_token

    # -- connection ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = None
        self._session = None

    def _fail(self, why: str) -> None:
        self.stats.errors += 1
        self._reset()
        self._down_until = time.monotonic() + self.retry_interval_s
        if not self._down_logged:
            self._down_logged = True
            log.warning("lmcache: server %s %s; lookups miss and stores drop until it answers (retrying every %.0fs)",
                        self.url, why, self.retry_interval_s)

    def _roundtrip(self, msg: dict, frames: list[bytes] = ()) -> tuple[dict, list[bytes]] | None:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.url)
        rid = self._next_id
        self._next_id += 1
        msg = {**msg, "v": PROTOCOL_VERSION, "id": rid, "token": self._token}
        self._sock.send_multipart([encode(msg), *frames])
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self._sock.poll(left):
                self._fail(f"did not answer within {self.config.remote_timeout_s}s")
                return None
            reply_frames = self._sock.recv_multipart()
            reply = decode(reply_frames[0])
            if reply.get("id") == rid:  # anything else is a late answer to a request we gave up on
                return reply, reply_frames[1:]

    def _credentials(self) -> None:
        """The token this client presents (``server_token``, else the local secret of a server on this host
        run by this user) and its liveness lock (only a client that holds one may map the pool)."""
        if not self.config.server_token:
            url = urlsplit(self.url)
            local = url.hostname in ("127.0.0.1", "localhost", "::1") or (url.hostname or "").startswith("127.")
            # the local secret is never sent to another host, even one listening on the same port number
            self._token = read_local_secret(url.port or 0) if local else ""
        if self._alive is None and not self._bytes_mode:
            try:
                self._alive = ClientLock()
            except OSError as e:
                log.warning("lmcache: cannot create a liveness lock in /dev/shm (%s); moving bytes over the socket", e)
                self._bytes_mode = True

    def _hello(self) -> bool:
        g = self.identity.geometry
        self._credentials()
        got = self._roundtrip({"op": "hello", "model": self.identity.model_name, "heads": list(self.head_range),
                               "pid": os.getpid(), "alive": None if self._alive is None else self._alive.path,
                               "geometry": [g.num_layers, g.num_kv_heads, g.k_dim, g.v_dim, DTYPE_CODES[g.dtype], g.kind]})
        if got is None:
            return False
        reply, _ = got
        if not reply.get("ok"):
            raise ProtocolError(f"lmcache server {self.url} refused the connection: {reply.get('error')}")
        if reply["chunk_size"] != self.config.chunk_size:
            raise ProtocolError(f"lmcache server {self.url} uses chunk_size {reply['chunk_size']}, this engine "
                                f"{self.config.chunk_size}: set the same chunk_size on both")
        if reply["server"] != self._instance:
            if self._shm is not None:
                self._shm.close()
                self._shm = None
            if not self._bytes_mode and reply.get("shm_path") is None:
                log.warning("lmcache: server %s cannot see this process's liveness lock (another /dev/shm?); moving "
                            "bytes over the socket instead (slower)", self.url)
                self._bytes_mode = True
            if not self._bytes_mode:
                try:
                    self._shm = SharedBuffer.attach(reply["shm_path"], reply["shm_size"])
                    self._shm.pin_for_accelerator()
                except (OSError, ValueError) as e:
                    log.warning("lmcache: cannot map the server's pool (%s: %s); moving bytes over the socket instead "
                                "(slower)", type(e).__name__, e)
                    self._bytes_mode = True
            self._instance = reply["server"]
        self._session = reply["session"]
        if self._down_logged:
            self._down_logged = False
            log.warning("lmcache: server %s reachable again", self.url)
        return True

    def _connected(self) -> bool:
        with self._lock:
            if time.monotonic() < self._down_until:
                return False
            return self._session is not None or self._hello()

    def _call(self, op: str, frames: list[bytes] = (), **fields) -> tuple[dict, list[bytes]] | None:
        """One request; None when the server is unavailable (already counted)."""
        with self._lock:
            if time.monotonic() < self._down_until:
                return None
            if self._session is None and not self._hello():
                return None
            got = self._roundtrip({"op": op, "session": self._session, **fields}, list(frames))
            if got is None:
                return None
            reply, out = got
            if reply.get("server") != self._instance:  # restarted under us: offsets mean nothing now
                self._reset()
                self.stats.errors += 1
                return None
            if not reply.get("ok"):
                error = str(reply.get("error"))
                if error.startswith("unknown session"):
                    self._reset()
                    return None
                if error.startswith("protocol version") or "token" in error:
                    raise ProtocolError(f"lmcache server {self.url}: {error}")
                self.stats.errors += 1
                log.warning("lmcache: server refused %s: %s", op, error)
                return None
            return reply, out

    # -- the TierStack interface --------------------------------------------------------------------

    def count_prefix(self, chunks: Iterable[bytes], head_start: int, head_end: int, total_heads: int) -> int:
        return len(self.lookup_tiers(ObjectKey(c, head_start, head_end, total_heads) for c in chunks))

    def lookup_tiers(self, okeys: Iterable[ObjectKey]) -> list[str]:
        got = self._call("lookup", keys=[k.wire() for k in okeys])  # with the head count: shards of other TP sizes serve
        return [] if got is None else list(got[0]["tiers"])

    @property
    def tier_problems(self) -> list[str]:
        return []  # the server's tiers: its banner, /health and /stats say what it runs without

    def reserve_many(self, items: Sequence[tuple[ObjectKey, int]]) -> list[ReserveAnswer]:
        if not items:
            return []
        got = self._call("reserve", items=[[str(k), n] for k, n in items]) if self._connected() else None
        if got is None:
            self.stats.drops += len(items)
            return [None] * len(items)
        reply = got[0]
        if reply.get("over_quota") and not self._quota_logged:
            self._quota_logged = True
            log.warning("lmcache: the server dropped %d chunks of one store: this client holds its quota of pool memory "
                        "(lmcache server --client-quota-gb); logged once", reply["over_quota"])
        if self._bytes_mode:  # the pool cannot be mapped here: fill private buffers, send them with put
            if reply["lease"]:
                self._call("abort", lease=reply["lease"])
            return [EXISTS if s == "exists" else Slot(k, n, 0, -1, torch.empty(n, dtype=torch.uint8))
                    for (k, n), s in zip(items, reply["slots"])]
        out: list[ReserveAnswer] = []
        for (key, n), slot in zip(items, reply["slots"]):
            if slot == "exists":
                out.append(EXISTS)
            elif slot is None:
                out.append(None)
            else:
                out.append(Slot(key, n, reply["lease"], slot, self._shm.tensor[slot : slot + n]))
        return out

    def abort(self, objs: Iterable[Any]) -> None:
        for lease in {o.lease for o in objs if isinstance(o, Slot) and o.offset >= 0 and o.lease}:
            self._call("abort", lease=lease)

    def commit_many(self, items: Sequence[tuple[ObjectKey, ChunkHeader, Reservation]]) -> Committed:
        if not items:
            return Committed(0, 0)
        slots = [s for _, _, s in items if isinstance(s, Slot)]
        if len(slots) != len(items):
            raise TypeError("commit of a reservation this server client did not hand out")
        items = [(k, h, s) for (k, h, _), s in zip(items, slots)]
        if items[0][2].offset < 0:  # byte mode
            stored = refused = 0
            for key, header, slot in items:
                got = self._call("put", [bytes(byte_view(slot.raw))], key=str(key), header=header.pack())
                if got is None:
                    refused += 1
                else:
                    stored += got[0]["stored"]
            return Committed(stored, refused)
        got = self._call("commit", lease=items[0][2].lease,
                         items=[[str(k), h.pack(), s.offset] for k, h, s in items])
        if got is None:  # refused (lease lost, server gone): none of these chunks is cached
            self.stats.drops += len(items)
            return Committed(0, len(items))
        self.stats.stores += got[0]["stored"]
        return Committed(got[0]["stored"], 0)

    def acquire_prefix(self, okeys: Iterable[ObjectKey], promote: bool | None = None) -> list[Entry]:
        keys = [k.wire() for k in okeys]
        if not keys or not self._connected():
            return []
        if self._bytes_mode:
            got = self._call("get", keys=keys)
            if got is None:
                return []
            headers = [ChunkHeader.unpack(h) for h in got[0]["headers"]]
            return [Entry(h, 0, torch.frombuffer(bytearray(p), dtype=torch.uint8)) for h, p in zip(headers, got[1])]
        got = self._call("acquire", keys=keys)
        if got is None:
            self.stats.misses += 1
            return []
        reply = got[0]
        entries = []
        for offset, raw_header in reply["items"]:
            header = ChunkHeader.unpack(raw_header)
            entries.append(Entry(header, reply["lease"], self._shm.tensor[offset : offset + header.payload_nbytes]))
        self.stats.hits += len(entries)
        return entries

    def release_many(self, entries: Iterable[Readable]) -> bool:
        """Release read leases. False when a lease was no longer held (the server restarted, or it refused):
        then the bytes copied under it are not vouched for, and the caller treats the load as failed."""
        ok = True
        for lease in {e.lease for e in entries if isinstance(e, Entry) and e.lease}:
            ok = self._call("release", lease=lease) is not None and ok
        return ok

    def prefetch(self, okeys: Iterable[ObjectKey]) -> int:
        got = self._call("prefetch", keys=[k.wire() for k in okeys])
        return 0 if got is None else got[0]["cpu"]

    def poll_evictions(self) -> int:
        """Tell ``eviction_listeners`` which chunks left the server's CPU tier since the last poll (the
        server evicts, not this engine: it keeps a log engines read). Returns how many were reported."""
        if not self.eviction_listeners:
            return 0
        got = self._call("evicted", since=self._evicted_cursor)
        if got is None:
            return 0
        reply = got[0]
        if reply["lost"]:
            log.info("lmcache: some evictions happened too long ago to be announced (the server keeps the last %d)",
                     len(reply["records"]))
        self._evicted_cursor = reply["next"]
        for _, key, where in reply["records"]:
            okey = ObjectKey.parse(key)
            for listener in list(self.eviction_listeners):
                listener(okey, where)
        return len(reply["records"])

    def flush(self) -> None:
        pass  # write-back happens in the server

    def queue_depths(self) -> dict[str, int]:
        got = self._call("stats")
        return {} if got is None else dict(got[0].get("queues", {}))

    def tier_stats(self) -> dict[str, dict[str, int]]:
        got = self._call("stats")
        server = {} if got is None else got[0]["tiers"]
        return {"client": self.stats.as_dict(), **{f"server_{k}": v for k, v in server.items()}}

    def clear(self) -> int:
        got = self._call("clear")
        return 0 if got is None else got[0]["cleared"]

    def close(self) -> None:
        with self._lock:
            self._reset()
            if self._shm is not None:
                self._shm.close()
                self._shm = None
            if self._alive is not None:  # the server forgets this client at its next sweep
                self._alive.close()
                self._alive = None


def _open(request: StoreRequest) -> ServerStack:
    return ServerStack(request.config, request.identity, request.head_range)


@hookimpl
def lmcache_chunk_stores() -> list[ChunkStoreSpec]:
    return [ChunkStoreSpec("mp", _open, "a shared 'lmcache server' owns the pool; engines map it (server_url)")]
