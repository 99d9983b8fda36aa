"""The remote tier on Redis or Valkey (single node or cluster), shared by every engine that points at it.

An object is stored as parts of at most ``remote_part_mb`` plus a header key written last: the header's
presence is the commit point, so a writer that dies mid-object leaves no visible object. The header records
the part size it was written with (``part_nbytes``): engines with different ``remote_part_mb`` share objects,
and ``remove`` deletes every part. A head sub-range (another TP size) is read with GETRANGEs of the parts
that hold it, verified against the object's per-head checksums. All keys of an
object share one hash tag, so in a cluster they live on one slot and are read with one MGET. Each part's
bytes are checked against the header's checksum before anything is used.

Failure policy (``RemoteHealth``): a down, unreachable or slow server makes lookups miss and stores drop
(counted); the engine never waits longer than ``remote_timeout_s``. After a failure the tier stays quiet for
a second, then tries again, so it reconnects by itself when the server is back. Memory on the server is bounded by
the server's own ``maxmemory`` + ``allkeys-lru`` policy (set it; see README).
"""

from __future__ import annotations

import logging
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, check_sealed, verify_heads
from lmcache.core.config import LMCacheConfig
from lmcache.core.hookspecs import HeadDest, StorageTierSpec, hookimpl
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.tiers.health import RemoteHealth
from lmcache.core.tiers.resp import RespAddress, RespReader
from lmcache.core.tiers.stats import TierStats
from lmcache.core.tiers.whole_load import load_whole

log = logging.getLogger("lmcache")
SCHEMES = ("redis", "rediss", "valkey", "valkeys", "redis+cluster", "rediss+cluster", "valkey+cluster")
_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
             redis.exceptions.ResponseError, OSError)


def _parse(url: str, password: str, timeout: float) -> redis.Redis | RedisCluster:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"remote_url '{url}': scheme '{scheme}' is not one of {', '.join(SCHEMES)}")
    tls = scheme.startswith(("rediss", "valkeys"))
    secret = password or (unquote(parts.password) if parts.password else None)
    user = unquote(parts.username) if parts.username else None
    # No client-side retries: redis-py's default backoff would hold the engine for seconds; the tier's
    # own quiet period after a failure does the retrying, off the hot path.
    common: dict[str, Any] = dict(password=secret, username=user, socket_timeout=timeout,
                                  socket_connect_timeout=timeout, ssl=tls, retry=Retry(NoBackoff(), 0))
    if scheme.endswith("+cluster"):
        hosts = parts.netloc.rsplit("@", 1)[-1]
        nodes = []
        for hp in hosts.split(","):
            host, _, port = hp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"remote_url '{url}': cluster seeds must be host:port[,host:port...]")
            nodes.append(ClusterNode(host, int(port)))  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        return RedisCluster(startup_nodes=nodes, require_full_coverage=True, **common)
    if parts.port is None and not parts.hostname:
        raise ValueError(f"remote_url '{url}': expected redis://host:port/db")
    db = int(parts.path.lstrip("/") or 0) if parts.path.lstrip("/").isdigit() or not parts.path.lstrip("/") else None
    if db is None:
        raise ValueError(f"remote_url '{url}': the path must be a database number, e.g. redis://host:6379/0")
    return redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db, **common)


def _resp_address(url: str, password: str, timeout: float) -> RespAddress | None:
    """Where the zero-copy reader connects (single node, plain TCP), or None (a cluster or TLS)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "valkey"):
        return None
    path = parts.path.lstrip("/")
    return RespAddress(parts.hostname or "127.0.0.1", parts.port or 6379, int(path) if path.isdigit() else 0,
                       unquote(parts.username) if parts.username else None,
                       password or (unquote(parts.password) if parts.password else None), timeout)


class RedisTier:
    name = "redis"

    def __init__(self, url: str, password: str = "", timeout_s: float = 1.0, part_bytes: int = 8 << 20,
                 retry_interval_s: float = 1.0) -> None:
        self.url = url
        self.client = _parse(url, password, timeout_s)
        addr = _resp_address(url, password, timeout_s)
        self._reader = RespReader(addr) if addr is not None else None
        self.part_bytes = part_bytes
        self.stats = TierStats()
        self.health = RemoteHealth(self._safe_url(), self.stats, retry_interval_s)

    def _safe_url(self) -> str:
        p = urlsplit(self.url)
        return self.url.replace(f":{p.password}@", ":***@") if p.password else self.url

    def safe_url(self) -> str:
        return self._safe_url()

    def ping(self) -> bool:
        try:
            self.client.ping()
            return True
        except _FAILURES:
            return False

    # -- keys ---------------------------------------------------------------------------------------

    @staticmethod
    def _hkey(key: ObjectKey) -> str:
        return f"lmc:{{{key}}}:h"

    @staticmethod
    def _pkey(key: ObjectKey, i: int) -> str:
        return f"lmc:{{{key}}}:{i}"

    # -- API ----------------------------------------------------------------------------------------

    def contains(self, key: ObjectKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[ObjectKey]) -> list[bool]:
        if not keys or not self.health.usable():
            return [False] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._hkey(k))
            found = [bool(x) for x in pipe.execute()]
        except _FAILURES as e:
            self.health.failed("lookup", e)
            return [False] * len(keys)
        self.health.ok()
        return found

    def load(self, key: ObjectKey, alloc: Callable[[int], MemoryObj | None]) -> tuple[ChunkHeader, MemoryObj] | None:
        return load_whole(lambda dest: self._read(key, None, dest), alloc)

    def load_heads(self, key: ObjectKey, head_start: int, head_end: int, dest: HeadDest) -> ChunkHeader | None:
        """Heads [head_start, head_end) of the object: GETRANGEs of the parts holding them (RangedLoad)."""
        return self._read(key, (head_start, head_end), dest)

    def _read(self, key: ObjectKey, heads: tuple[int, int] | None, dest: HeadDest) -> ChunkHeader | None:
        if not self.health.usable():
            self.stats.misses += 1
            return None
        try:
            raw = (self._reader.get(self._hkey(key).encode()) if self._reader is not None
                   else self._bytes(self.client.get(self._hkey(key))))
            if raw is None:
                self.stats.misses += 1
                return None
            header, sums = check_sealed(raw, key)
            if len(raw) != header.sealed_nbytes:
                raise ChunkCorrupt("bad header object")
            h0, h1 = heads or (header.head_start, header.head_end)
            if not header.head_start <= h0 < h1 <= header.head_end:
                raise ValueError(f"heads [{h0}, {h1}) are not within the object's [{header.head_start}, {header.head_end})")
            first = h0 - header.head_start
            start, nbytes = first * header.head_nbytes, (h1 - h0) * header.head_nbytes
            # the writer's part size, from the header: readers with other settings find every part
            step = header.part_nbytes or max(1, header.payload_nbytes)
            spans = [(i, max(start, i * step), min(start + nbytes, (i + 1) * step))
                     for i in range(start // step, -(-(start + nbytes) // step))]
            whole = heads is None or (start, nbytes) == (0, header.payload_nbytes)

            def claim() -> memoryview | None:
                view = dest(header)
                if view is None:
                    self.stats.drops += 1
                elif len(view) != nbytes:
                    raise ValueError(f"dest holds {len(view)} bytes for {nbytes} bytes of heads")
                return view

            if self._reader is not None:  # parts received straight into their place in the pool
                view = claim()
                if view is None:
                    return None
                cmds = [(b"GET", self._pkey(key, i).encode()) if whole else
                        (b"GETRANGE", self._pkey(key, i).encode(), b"%d" % (lo - i * step), b"%d" % (hi - i * step - 1))
                        for i, lo, hi in spans]
                places = [view[lo - start : hi - start] for _, lo, hi in spans]
                if self._reader.read_into(cmds, places) != [len(p) for p in places]:
                    raise ChunkCorrupt("missing or truncated parts")
                verify_heads(header, sums, view, first)
            else:  # a cluster or TLS: redis-py's replies, copied into place
                if whole:
                    got = [self._bytes(p) for p in self.client.mget([self._pkey(key, i) for i, _, _ in spans])]
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for i, lo, hi in spans:
                        pipe.getrange(self._pkey(key, i), lo - i * step, hi - i * step - 1)
                    got = [self._bytes(p) for p in pipe.execute()]
                if any(p is None or len(p) != hi - lo for p, (_, lo, hi) in zip(got, spans)):
                    raise ChunkCorrupt("missing or truncated parts")
                view = claim()
                if view is None:
                    return None
                at = 0
                for p in got:
                    assert p is not None
                    view[at : at + len(p)] = p
                    at += len(p)
                verify_heads(header, sums, view, first)
        except ChunkCorrupt as e:
            self.stats.corrupt += 1
            log.warning("lmcache remote tier: object %s is corrupt (%s); deleted, treated as a miss", key, e)
            self.remove(key)
            return None
        except _FAILURES as e:
            self.health.failed("read", e)
            return None
        self.health.ok()
        self.stats.hits += 1
        self.stats.bytes_out += nbytes
        return header

    def put(self, key: ObjectKey, header: bytes, payload: memoryview) -> bool:
        if not self.health.usable():
            self.stats.drops += 1
            return False
        try:
            step = self.part_bytes
            # the part layout goes into the header, so a reader or remover with another part size finds every part
            parsed = ChunkHeader.unpack(header)
            sealed = parsed.replace(part_nbytes=step).pack() + bytes(header[HEADER_BYTES:])
            if self._reader is not None:  # parts sent from the pool's memory, no copy
                cmds: list[tuple[bytes | memoryview, ...]] = [
                    (b"SET", self._pkey(key, i).encode(), payload[at : at + step])
                    for i, at in enumerate(range(0, max(len(payload), 1), step))]
                cmds.append((b"SET", self._hkey(key).encode(), sealed))  # last: the commit point
                self._reader.send_all(cmds)
            else:
                pipe = self.client.pipeline(transaction=False)
                for i, at in enumerate(range(0, max(len(payload), 1), step)):
                    pipe.set(self._pkey(key, i), payload[at : at + step])
                pipe.set(self._hkey(key), sealed)  # last: the commit point
                pipe.execute()
        except _FAILURES as e:
            self.health.failed("write", e)
            self.stats.drops += 1
            return False
        self.health.ok()
        self.stats.stores += 1
        self.stats.bytes_in += len(payload)
        return True

    def remove(self, key: ObjectKey) -> bool:
        """Delete the header (the commit point) first, then every part: as many as the header says, or,
        when the header is unreadable, parts in order until one is missing (parts are numbered 0..n-1)."""
        try:
            raw = self._bytes(self.client.get(self._hkey(key)))
            nparts = 0
            if raw is not None:
                try:
                    h = ChunkHeader.unpack(raw)
                    nparts = max(1, -(-h.payload_nbytes // (h.part_nbytes or max(1, h.payload_nbytes))))
                except ChunkCorrupt:
                    pass
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self._hkey(key))
            for i in range(nparts):
                pipe.delete(self._pkey(key, i))
            pipe.execute()
            at = nparts
            while True:  # parts the header did not name (a header lost or corrupt): delete until none is left
                pipe = self.client.pipeline(transaction=False)
                for i in range(at, at + 16):
                    pipe.delete(self._pkey(key, i))
                deleted = pipe.execute()
                if not all(deleted):
                    break
                at += 16
            return raw is not None
        except _FAILURES as e:
            self.health.failed("delete", e)
            return False

    @staticmethod
    def _bytes(value: object) -> bytes | None:
        """A reply as bytes (this client never decodes replies to str)."""
        if value is None or isinstance(value, bytes):
            return value
        raise ChunkCorrupt(f"unexpected reply type {type(value).__name__}")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        try:
            self.client.close()
        except Exception:  # closing a dead connection may raise; nothing to save
            pass


def _factory(url: str, config: LMCacheConfig) -> RedisTier:
    return RedisTier(url, config.remote_password, config.remote_timeout_s, int(config.remote_part_mb * 2**20))


@hookimpl
def lmcache_storage_tiers() -> list[StorageTierSpec]:
    return [StorageTierSpec(s, _factory, "Redis / Valkey (single node, or cluster with +cluster)") for s in SCHEMES]
