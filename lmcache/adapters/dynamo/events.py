"""KV events for Dynamo's KV-aware router: which prefixes sit in lmcache's CPU and disk tiers.

Dynamo routes a request to the worker that already holds its prefix, learning who holds what from KV
events. Engines publish their GPU blocks; this publishes lmcache's tiers, with the storage medium
(``CPU_PINNED`` / ``DISK``) that Dynamo's router weighs separately (``host_cache_hit_weight``,
``disk_cache_hit_weight``). Without it the router never sees a CPU-tier hit (dynamo#5565).

Wire: Dynamo's ZMQ relay format, the one vLLM's and SGLang's ``--kv-events-config`` publishers emit and
Dynamo's worker relay (``KvEventPublisher(zmq_endpoint=...)``) and standalone indexer
(``python -m dynamo.indexer --workers ID=ENDPOINT``) subscribe to: multipart ``[topic, seq (8-byte
big-endian), msgpack([ts, [event, ...], dp_rank])]``, events as tagged maps
``{"type": "BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium}``
and ``{"type": "BlockRemoved", block_hashes, medium}``.

Hashes are Dynamo's, as its router computes them from token ids: a block's local hash is XXH3-64
(seed 1337) of its tokens as little-endian u32; a block's sequence hash is the first block's local hash,
then XXH3-64 (seed 1337) of (parent sequence hash, local hash) as little-endian u64 - published as
signed int64. No Dynamo package is imported: pyzmq, msgspec and xxhash only.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import msgspec
import xxhash
import zmq

log = logging.getLogger("lmcache")

SEED = 1337
#: lmcache tier -> Dynamo's storage medium
MEDIUM = {"cpu": "CPU_PINNED", "disk": "DISK"}
_U64 = 1 << 64


def _signed(u: int) -> int:
    return u - _U64 if u >= 1 << 63 else u


def local_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Dynamo's ``compute_block_hash_for_seq``: one unsigned hash per full block."""
    n = len(token_ids) // block_size
    fmt = f"<{block_size}I"
    return [xxhash.xxh3_64_intdigest(struct.pack(fmt, *token_ids[i * block_size : (i + 1) * block_size]), seed=SEED)
            for i in range(n)]


def sequence_hashes(local: list[int], parent: int | None, namespace: str | None = None) -> list[int]:
    """Dynamo's chained sequence hashes (signed int64) of blocks with these local hashes after ``parent``.
    A namespace (LoRA adapter, cache salt) seeds the chain, so its blocks never share an identity with the
    same tokens outside it (Dynamo derives its own namespaced token hashes from the event's fields)."""
    out = []
    prev = None if parent is None else parent % _U64
    if prev is None and namespace:
        prev = xxhash.xxh3_64_intdigest(namespace.encode(), seed=SEED)
    for h in local:
        prev = h if prev is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, h), seed=SEED)
        out.append(_signed(prev))
    return out


class DynamoEventPublisher:
    """Binds a ZeroMQ XPUB socket (a PUB that also sees subscriptions) and publishes Dynamo KV events."""

    def __init__(self, endpoint: str, block_size: int, *, topic: str = "", dp_rank: int | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"router_events dynamo: block size {block_size} must be > 0 (the engine's KV block size)")
        self.block_size = block_size
        self.topic = topic.encode()
        self.dp_rank = dp_rank
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise ValueError(f"router_events_endpoint {endpoint!r}: cannot bind ({e}); choose a free address, e.g. "
                             "tcp://*:5558 (one per engine process)") from None
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._seq = 0
        self._subscribers = 0
        self._lock = threading.Lock()
        self._enc = msgspec.msgpack.Encoder()
        log.info("lmcache: publishing KV events for Dynamo's router on %s (block size %d)", self.endpoint, block_size)

    # -- RouterEventPublisher -------------------------------------------------------------------------

    def block_hashes(self, token_ids: list[int], parent: int | None, lora_name: str | None = None,
                     cache_salt: str | None = None) -> list[int]:
        namespace = "\x1f".join((lora_name or "", cache_salt or "")) if lora_name or cache_salt else None
        return sequence_hashes(local_block_hashes(token_ids, self.block_size), parent, namespace)

    def stored(self, block_hashes: list[int], parent: int | None, token_ids: list[int], tier: str,
               lora_name: str | None = None, cache_salt: str | None = None) -> None:
        n = len(block_hashes) * self.block_size
        event = {"type": "BlockStored", "block_hashes": list(block_hashes), "parent_block_hash": parent,
                 "token_ids": list(token_ids[:n]), "block_size": self.block_size, "lora_id": None,
                 "medium": MEDIUM[tier]}
        if lora_name:
            event["lora_name"] = lora_name  # Dynamo hashes the blocks of an adapter apart from the base model's
        if cache_salt:
            event["cache_salt"] = cache_salt
        self._send([event])

    def removed(self, block_hashes: list[int], tier: str) -> None:
        self._send([{"type": "BlockRemoved", "block_hashes": list(block_hashes), "medium": MEDIUM[tier]}])

    def close(self) -> None:
        with self._lock:
            if not self._sock.closed:
                self._sock.close()
                self._ctx.term()

    # -- wire ------------------------------------------------------------------------------------------

    def _send(self, events: list[dict]) -> None:
        payload = self._enc.encode([time.time(), events, self.dp_rank])
        with self._lock:
            if self._sock.closed:
                return
            self._drain_subscriptions()
            try:
                self._sock.send_multipart([self.topic, self._seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
            except zmq.Again:  # no subscriber room: the router is behind; events are advisory, never block
                log.debug("lmcache: router event dropped (subscriber queue full)")
            self._seq += 1

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                msg = self._sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._subscribers += 1
                log.info("lmcache: a Dynamo indexer subscribed to KV events on %s", self.endpoint)
            elif msg[:1] == b"\x00":
                self._subscribers = max(0, self._subscribers - 1)

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """True once some subscriber has joined (events sent before that are lost, as with any ZMQ PUB)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._drain_subscriptions()
                if self._subscribers > 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def open_publisher(config, block_size: int) -> DynamoEventPublisher:
    return DynamoEventPublisher(config.router_events_endpoint, block_size)
