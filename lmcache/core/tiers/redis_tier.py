"""The remote tier on Redis or Valkey (single node or cluster), shared by every engine that points at it.

An object is stored as parts of at most ``remote_part_mb`` plus a header key written last: the header's
presence is the commit point, so a writer that dies mid-object leaves no visible object. All keys of an
object share one hash tag, so in a cluster they live on one slot and are read with one MGET. Each part's
bytes are checked against the header's checksum before anything is used.

Failure policy: a down, unreachable or slow server makes lookups miss and stores drop (counted); the
engine never waits longer than ``remote_timeout_s``. After a failure the tier stays quiet for a second,
then tries again, so it reconnects by itself when the server is back. Memory on the server is bounded by
the server's own ``maxmemory`` + ``allkeys-lru`` policy (set it; see README).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, byte_view, check_header, payload_checksum
from lmcache.core.config import LMCacheConfig
from lmcache.core.hookspecs import StorageTierSpec, hookimpl
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.tiers.stats import TierStats

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


class RedisTier:
    name = "redis"

    def __init__(self, url: str, password: str = "", timeout_s: float = 1.0, part_bytes: int = 8 << 20,
                 retry_interval_s: float = 1.0) -> None:
        self.url = url
        self.client = _parse(url, password, timeout_s)
        self.part_bytes = part_bytes
        self.retry_interval_s = retry_interval_s
        self.stats = TierStats()
        self._down_until = 0.0
        self._down_logged = False
        self._lock = threading.Lock()

    # -- connection health --------------------------------------------------------------------------

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        self.stats.errors += 1
        with self._lock:
            self._down_until = time.monotonic() + self.retry_interval_s
            if not self._down_logged:
                self._down_logged = True
                log.warning("lmcache remote tier %s: %s failed (%s: %s); lookups miss and stores drop until it "
                            "answers again (retrying every %.1fs)", self._safe_url(), what, type(e).__name__, e,
                            self.retry_interval_s)

    def _ok(self) -> None:
        if self._down_logged:
            with self._lock:
                if self._down_logged:
                    self._down_logged = False
                    log.warning("lmcache remote tier %s: reachable again", self._safe_url())

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
        if not keys or not self._usable():
            return [False] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._hkey(k))
            found = [bool(x) for x in pipe.execute()]
        except _FAILURES as e:
            self._failed("lookup", e)
            return [False] * len(keys)
        self._ok()
        return found

    def load(self, key: ObjectKey, alloc: Callable[[int], MemoryObj | None]) -> tuple[ChunkHeader, MemoryObj] | None:
        if not self._usable():
            self.stats.misses += 1
            return None
        obj = None
        try:
            raw = self._bytes(self.client.get(self._hkey(key)))
            if raw is None:
                self.stats.misses += 1
                return None
            if len(raw) != HEADER_BYTES:
                raise ChunkCorrupt("bad header object")
            header = check_header(raw, key)
            nparts = max(1, -(-header.payload_nbytes // self.part_bytes))
            got = [self._bytes(p) for p in self.client.mget([self._pkey(key, i) for i in range(nparts)])]
            parts = [p for p in got if p is not None]
            if len(parts) != nparts or sum(len(p) for p in parts) != header.payload_nbytes:
                raise ChunkCorrupt("missing or truncated parts")
            obj = alloc(header.payload_nbytes)
            if obj is None:
                self.stats.drops += 1
                return None
            dest = byte_view(obj.raw)
            at = 0
            for p in parts:
                dest[at : at + len(p)] = p
                at += len(p)
            if payload_checksum(dest) != header.checksum:
                raise ChunkCorrupt("payload checksum mismatch")
        except ChunkCorrupt as e:
            if obj is not None:
                obj.unref()
            self.stats.corrupt += 1
            log.warning("lmcache remote tier: object %s is corrupt (%s); deleted, treated as a miss", key, e)
            self.remove(key)
            return None
        except _FAILURES as e:
            if obj is not None:
                obj.unref()
            self._failed("read", e)
            return None
        self._ok()
        self.stats.hits += 1
        self.stats.bytes_out += header.payload_nbytes
        return header, obj

    def put(self, key: ObjectKey, header: bytes, payload: memoryview) -> bool:
        if not self._usable():
            self.stats.drops += 1
            return False
        try:
            pipe = self.client.pipeline(transaction=False)
            step = self.part_bytes
            for i, at in enumerate(range(0, max(len(payload), 1), step)):
                pipe.set(self._pkey(key, i), payload[at : at + step])
            pipe.set(self._hkey(key), header)  # last: the commit point
            pipe.execute()
        except _FAILURES as e:
            self._failed("write", e)
            self.stats.drops += 1
            return False
        self._ok()
        self.stats.stores += 1
        self.stats.bytes_in += len(payload)
        return True

    def remove(self, key: ObjectKey) -> bool:
        try:
            raw = self._bytes(self.client.get(self._hkey(key)))
            nparts = 1
            if raw is not None and len(raw) >= HEADER_BYTES:
                try:
                    nparts = max(1, -(-ChunkHeader.unpack(raw).payload_nbytes // self.part_bytes))
                except ChunkCorrupt:
                    pass
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self._hkey(key))
            for i in range(nparts):
                pipe.delete(self._pkey(key, i))
            pipe.execute()
            return raw is not None
        except _FAILURES as e:
            self._failed("delete", e)
            return False

    @staticmethod
    def _bytes(value: object) -> bytes | None:
        """A reply as bytes (this client never decodes replies to str)."""
        if value is None or isinstance(value, bytes):
            return value
        raise ChunkCorrupt(f"unexpected reply type {type(value).__name__}")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection may raise; nothing to save
            pass


def _factory(url: str, config: LMCacheConfig) -> RedisTier:
    return RedisTier(url, config.remote_password, config.remote_timeout_s, int(config.remote_part_mb * 2**20))


@hookimpl
def lmcache_storage_tiers() -> list[StorageTierSpec]:
    return [StorageTierSpec(s, _factory, "Redis / Valkey (single node, or cluster with +cluster)") for s in SCHEMES]
