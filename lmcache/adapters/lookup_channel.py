"""Scheduler-to-worker lookups, for in-process mode when the engine runs its workers in other processes.

In ``mode: inproc`` the pool lives in the worker's process (it holds the KV memory the copies touch).
vLLM often runs its scheduler in another process than its workers (its CPU platform always does; GPUs do
with TP > 1 or the multiprocess executor), so the scheduler cannot look the pool up itself. The worker
therefore answers lookups on a unix socket named after vLLM's engine id (the same in every process of one
engine) and data-parallel rank; the scheduler asks there when no engine lives in its own process.

A lookup is read-only and answered from the pool as it is at that instant, as in one process: a chunk
evicted between the lookup and the load is a load error that vLLM recomputes. The socket is created mode
0600 (only this user's processes may ask). A worker that does not answer within ``remote_timeout_s`` makes
the lookup a miss, never a stall of the scheduler.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from typing import Callable

import msgspec
import zmq

log = logging.getLogger("lmcache")

#: lookup(chunk keys, head ranges) -> leading chunks cached for every head range
LookupFn = Callable[[list[bytes], list[tuple[int, int]]], int]


def channel_address(engine_id: str, dp_rank: int = 0) -> str:
    """The ipc address of one engine's lookup channel (short: unix socket paths are limited to 107 bytes)."""
    digest = hashlib.sha256(engine_id.encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/lmcache-lookup-{os.geteuid()}-{digest}-{dp_rank}.sock"


class LookupServer:
    """The worker's side: answers lookups on a background thread until ``close``."""

    def __init__(self, address: str, lookup: LookupFn) -> None:
        self.address = address
        self._lookup = lookup
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        path = address[len("ipc://"):]
        if os.path.exists(path):
            if LookupClient(address, 0.3).answers():
                self._sock.close(0)
                raise RuntimeError(f"another engine serves lookups at {address}: two vLLM engines share the engine_id "
                                   "(kv_transfer_config.engine_id) on this host; give each its own, or leave it unset")
            os.unlink(path)  # a dead engine's leftover
        old = os.umask(0o177)
        try:
            self._sock.bind(address)
        finally:
            os.umask(old)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        decoder = msgspec.msgpack.Decoder(dict)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                msg = decoder.decode(self._sock.recv())
                hits = self._lookup(list(msg["keys"]), [tuple(r) for r in msg["shards"]])
                reply = {"hits": int(hits)}
            except Exception as e:  # a bad request or a failing tier: a miss for the asker
                log.warning("lmcache: lookup channel: %s: %s", type(e).__name__, e)
                reply = {"hits": 0, "error": f"{type(e).__name__}: {e}"}
            try:
                self._sock.send(msgspec.msgpack.encode(reply))
            except zmq.ZMQError:
                pass
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.address[len("ipc://"):])
        except FileNotFoundError:
            pass


class LookupClient:
    """The scheduler's side: one request at a time (the scheduler is single-threaded)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_ms = max(1, int(timeout_s * 1000))
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._warned = False
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        return self._sock

    def __call__(self, keys: list[bytes], shards: list[tuple[int, int]]) -> int:
        if not os.path.exists(self.address[len("ipc://"):]):
            self._warn("no worker serves lookups yet")
            return 0
        with self._lock:
            sock = self._socket()
            sock.send(msgspec.msgpack.encode({"keys": keys, "shards": [list(r) for r in shards]}))
            if not sock.poll(self.timeout_ms):
                sock.close(0)  # a REQ socket that got no answer cannot ask again
                self._sock = None
                self._warn(f"the worker did not answer within {self.timeout_ms} ms")
                return 0
            reply = msgspec.msgpack.decode(sock.recv())
        return int(reply.get("hits", 0))

    def answers(self) -> bool:
        """Whether a live worker serves this address (an empty lookup, answered within the timeout)."""
        with self._lock:
            sock = self._socket()
            sock.send(msgspec.msgpack.encode({"keys": [], "shards": []}))
            alive = bool(sock.poll(self.timeout_ms))
            sock.close(0)
            self._sock = None
            return alive

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("lmcache: scheduler lookup through %s missed: %s (logged once)", self.address, why)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(0)
                self._sock = None
