"""The local disk tier: one file per stored object, in the canonical chunk format.

Crash safety: an object is written to ``tmp/`` and renamed into place (atomic on POSIX), so a reader sees
either the whole file or none; a process killed mid-write leaves only a temp file, removed at the next
start. Power loss can still tear a file the kernel had not flushed (unless ``local_disk_fsync``): the
header and payload checksums catch it, and a bad file is counted, deleted and treated as a miss.

Warm restart: file names carry the object keys, so start-up lists the directory (and stats each file
for its size and access time) without reading any payload. Eviction is LRU by last access; across
restarts the order comes from file modification times, which every hit refreshes.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, payload_checksum
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.tiers.stats import TierStats

log = logging.getLogger("lmcache")
SUFFIX = ".lmc"


class TierUnavailable(RuntimeError):
    """A tier cannot work with its configuration; the message names the setting and the fix."""


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_into(fd: int, dest: memoryview) -> int:
    got = 0
    while got < len(dest):
        n = os.readv(fd, [dest[got:]])
        if n == 0:
            break
        got += n
    return got


def check_header(raw: bytes, key: ObjectKey) -> ChunkHeader:
    header = ChunkHeader.unpack(raw)
    if (header.chunk_key, header.head_start, header.head_end) != (key.chunk, key.head_start, key.head_end):
        raise ChunkCorrupt("object holds another key")
    return header


class DiskTier:
    name = "disk"

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, fsync: bool = False) -> None:
        self.root = Path(path) / "lmcache-v1"
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.stats = TierStats()
        self._index: OrderedDict[ObjectKey, int] = OrderedDict()  # key -> file size, LRU first
        self._used = 0
        self._lock = threading.Lock()
        self._tmp = self.root / "tmp"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            probe = self._tmp / f"probe.{os.getpid()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise TierUnavailable(
                f"local_disk_path '{path}' is not usable ({e.strerror or e}): point it at a writable directory "
                f"or leave it empty to run without a disk tier"
            ) from None
        self._scan()

    # -- start-up -----------------------------------------------------------------------------------

    def _scan(self) -> None:
        for leftover in os.scandir(self._tmp):  # writes cut short by a crash
            try:
                os.unlink(leftover.path)
            except OSError:
                pass
        found: list[tuple[float, ObjectKey, int]] = []
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                if not entry.name.endswith(SUFFIX):
                    continue
                try:
                    key = ObjectKey.parse(entry.name[: -len(SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime, key, st.st_size))
        found.sort(key=lambda x: x[0])
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        self._evict_to(self.capacity)

    # -- paths --------------------------------------------------------------------------------------

    def _path(self, key: ObjectKey) -> Path:
        return self.root / key.chunk.hex()[:2] / f"{key}{SUFFIX}"

    # -- API ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return self._used

    def contains(self, key: ObjectKey) -> bool:
        return key in self._index

    def load(self, key: ObjectKey, alloc: Callable[[int], MemoryObj | None]) -> tuple[ChunkHeader, MemoryObj] | None:
        """Read and verify an object into memory from ``alloc(payload_nbytes)``; None on miss or corruption."""
        if key not in self._index:
            self.stats.misses += 1
            return None
        path = self._path(key)
        obj = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # evicted or deleted meanwhile
            self._forget(key)
            self.stats.misses += 1
            return None
        except OSError as e:
            self.stats.errors += 1
            log.warning("lmcache disk tier: cannot open %s: %s", path, e)
            return None
        try:
            header = check_header(os.pread(fd, HEADER_BYTES, 0), key)
            if os.fstat(fd).st_size != HEADER_BYTES + header.payload_nbytes or header.payload_nbytes != header.expected_nbytes():
                raise ChunkCorrupt("file size does not match its header")
            obj = alloc(header.payload_nbytes)
            if obj is None:
                self.stats.drops += 1
                return None
            dest = memoryview(obj.raw.numpy())
            os.lseek(fd, HEADER_BYTES, os.SEEK_SET)
            if read_into(fd, dest) != header.payload_nbytes or payload_checksum(dest) != header.checksum:
                raise ChunkCorrupt("payload checksum mismatch")
        except ChunkCorrupt as e:
            if obj is not None:
                obj.unref()
            self.stats.corrupt += 1
            log.warning("lmcache disk tier: %s is corrupt (%s); deleted, treated as a miss", path.name, e)
            self.remove(key)
            return None
        except OSError as e:
            if obj is not None:
                obj.unref()
            self.stats.errors += 1
            log.warning("lmcache disk tier: read of %s failed: %s", path.name, e)
            return None
        finally:
            os.close(fd)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        try:
            os.utime(path)  # the LRU order survives restarts
        except OSError:
            pass
        self.stats.hits += 1
        self.stats.bytes_out += header.payload_nbytes
        return header, obj

    def put(self, key: ObjectKey, header: bytes, payload: memoryview) -> bool:
        if key in self._index:
            return True
        size = len(header) + len(payload)
        if size > self.capacity:
            self.stats.drops += 1
            return False
        final = self._path(key)
        tmp = self._tmp / f"{key}.{os.getpid()}.{threading.get_ident()}"
        try:
            final.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, header)
                write_all(fd, payload)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.stats.errors += 1
            if e.errno == errno.ENOSPC:
                log.warning("lmcache disk tier: disk full under %s; chunk dropped (lower max_local_disk_size_gb)", self.root)
            else:
                log.warning("lmcache disk tier: write failed under %s: %s; chunk dropped", self.root, e)
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._used += size
        self.stats.stores += 1
        self.stats.bytes_in += len(payload)
        self._evict_to(self.capacity)
        return True

    def _forget(self, key: ObjectKey) -> int | None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            return size

    def remove(self, key: ObjectKey) -> bool:
        if self._forget(key) is None:
            return False
        try:
            os.unlink(self._path(key))
        except OSError:
            pass
        return True

    def _evict_to(self, limit: int) -> None:
        while True:
            with self._lock:
                if self._used <= limit or not self._index:
                    return
                key, size = self._index.popitem(last=False)
                self._used -= size
            self.stats.evictions += 1
            try:
                os.unlink(self._path(key))
            except OSError:
                pass

    def clear(self) -> int:
        keys = list(self._index)
        for key in keys:
            self.remove(key)
        return len(keys)

    def close(self) -> None:
        pass
