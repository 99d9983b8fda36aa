"""Asynchronous write-back to one lower tier: a bounded queue and its worker thread(s) (several for a tier
with ``ParallelWrites``, an object store whose throughput comes from objects in flight).

The engine never waits on a lower tier: when the queue is full the chunk is dropped and counted. A
queued chunk holds a reference on its CPU memory, so it is neither freed nor overwritten before the
worker has written it; the queued bytes are capped too, so a stalled tier cannot pin the CPU pool.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from lmcache.core.keys import ObjectKey
from lmcache.core.tiers.stats import TierStats

if TYPE_CHECKING:
    from lmcache.core.tiers.cpu import CpuEntry

log = logging.getLogger("lmcache")
_STOP = object()


class WriteBack:
    def __init__(self, tier: Any, max_queued: int, max_bytes: int, workers: int = 1) -> None:
        self.tier = tier
        self.max_bytes = max_bytes
        self._queued_bytes = 0
        self.stats = TierStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)  # CpuEntry, or the stop marker
        self._pending: set[ObjectKey] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"lmcache-writeback-{tier.name}-{n}", daemon=True)
                         for n in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def offer(self, entry: CpuEntry) -> bool:
        """Queue a CPU entry for writing; False (and counted) when the queue is full."""
        with self._lock:
            if entry.key in self._pending:
                return True
            if self._queued_bytes + entry.obj.size > self.max_bytes:
                self.stats.drops += 1
                return False
            entry.obj.ref()
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                entry.obj.unref()
                self.stats.drops += 1
                return False
            self._pending.add(entry.key)
            self._queued_bytes += entry.obj.size
        return True

    def pending(self, key: ObjectKey) -> bool:
        return key in self._pending

    def depth(self) -> int:
        """Chunks queued and not yet written."""
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is _STOP:
                    return
                if not self.tier.contains(entry.key):
                    header, payload = entry.encoded()  # checksum shared by every lower tier
                    if self.tier.put(entry.key, header, payload):
                        self.stats.stores += 1
                    else:
                        self.stats.errors += 1
            except Exception as e:  # a failing tier must not kill the worker
                self.stats.errors += 1
                log.warning("lmcache write-back to %s failed: %s: %s", self.tier.name, type(e).__name__, e)
            finally:
                if entry is not _STOP:
                    with self._lock:
                        self._pending.discard(entry.key)
                        self._queued_bytes -= entry.obj.size
                    entry.obj.unref()
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything queued so far is written (or failed)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=10)
