"""The local disk tier: one file per stored object, in the canonical chunk format.

Crash safety: an object is written to ``tmp/`` and renamed into place (atomic on POSIX), so a reader sees
either the whole file or none; a process killed mid-write leaves only a temp file, removed at the next
start. Power loss can still tear a file the kernel had not flushed (unless ``local_disk_fsync``): the
header and payload checksums catch it, and a bad file is counted, deleted and treated as a miss.

Warm restart: file names carry the object keys, so start-up lists the directory (and stats each file
for its size and access time) without reading any payload. Eviction is LRU by last access, a prompt's
chunks tail first (``chain_lru``, parents from the headers this process wrote); across restarts the order
comes from file modification times, which every hit refreshes.

Several processes on one directory (SGLang TP ranks, vLLM data-parallel engines, two servers) are a
normal deployment, so nothing here assumes the directory is this process's alone:
- each process holds an ``flock`` on its own owner file (``owners/<tag>.lock``) for its life and names its
  temp files with its tag: a starting process deletes only temp files whose owner is dead (the kernel
  drops a dead process's lock), never another live process's write in flight;
- an object appears by ``link`` (exclusive: one writer creates it, a second finds it there), and is
  counted once, by its creator, in one usage counter for the directory (``usage``); the link and its
  count, and every unlink and its uncount, happen under the directory lock, so the counter always equals
  the files' total; capacity is the directory's, not each process's, and evictions by any process keep
  the whole directory within ``capacity``;
- each process evicts from its own view in LRU order and, when that is not enough, rescans the directory
  for objects the others wrote; an object another process evicted is simply a miss here;
- an object another process wrote is found by its name on the first lookup that misses this process's
  index (one ``stat``), so processes share what they store. Every read still verifies both checksums.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Callable

from lmcache.core.chunk_format import NO_PARENT, ChunkCorrupt, ChunkHeader, check_header, head_sums, verify_heads
from lmcache.core.hookspecs import HeadDest, TierUnavailable
from lmcache.core.keys import ObjectKey
from lmcache.core.liveness import path_lock_held
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.tiers.chain_lru import ChainLru
from lmcache.core.tiers.stats import TierStats
from lmcache.core.tiers.whole_load import load_whole

log = logging.getLogger("lmcache")
SUFFIX = ".lmc"
_FIRST_READ = 4096  # one read gets the header and the head checksum table of any model up to 498 KV heads


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_into(fd: int, dest: memoryview, offset: int) -> int:
    """Fill ``dest`` from ``offset`` of the file; how many bytes arrived (fewer: the file ended)."""
    got = 0
    while got < len(dest):
        n = os.preadv(fd, [dest[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class DiskTier:
    """One directory of chunk files, shared safely with other processes (see the module docstring).

    Invariants: a file under its final name is complete (link of a fully written temp file); the
    directory's usage counter counts each final file once; this process's index is a subset of the
    directory's objects (a file may vanish under it: a miss). Lock rules: ``_lock`` guards the index and
    is never held across file I/O; the directory lock (``flock`` on ``lock``) guards the usage counter
    only, for a few microseconds at a time (a full rescan at start holds it longer).
    """

    name = "disk"

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int, fsync: bool = False) -> None:
        self.root = Path(path) / "lmcache-v1"
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.stats = TierStats()
        #: key -> file size, least recent first; a prompt's chunks leave tail first (chain_lru)
        self._index: ChainLru[int] = ChainLru()
        self._lock = threading.Lock()
        self._tmp = self.root / "tmp"
        self._owners = self.root / "owners"
        self.tag = secrets.token_hex(8)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._owners.mkdir(exist_ok=True)
            # held for this process's life: its temp files are its own while it lives
            self._owner_fd = os.open(self._owners / f"{self.tag}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
            self._dir_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._usage_fd = os.open(self.root / "usage", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise TierUnavailable(
                f"local_disk_path '{path}' is not usable ({e.strerror or e}): point it at a writable directory "
                f"or leave it empty to run without a disk tier"
            ) from None
        self._scan()

    # -- the directory's usage counter ----------------------------------------------------------------

    def _add_usage(self, delta: int) -> int:
        """Add ``delta`` bytes to the directory's usage; returns the new total."""
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        try:
            return self._add_usage_locked(delta)
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def _add_usage_locked(self, delta: int) -> int:
        raw = os.pread(self._usage_fd, 8, 0)
        total = max(0, (struct.unpack("<q", raw)[0] if len(raw) == 8 else 0) + delta)
        os.pwrite(self._usage_fd, struct.pack("<q", total), 0)
        return total

    @property
    def used_bytes(self) -> int:
        """Bytes of chunk files in the directory (every process's)."""
        return self._add_usage(0)

    # -- start-up -----------------------------------------------------------------------------------

    def _owner_alive(self, tag: str) -> bool:
        return path_lock_held(self._owners / f"{tag}.lock")

    def _scan(self) -> None:
        dead: set[str] = set()
        for leftover in os.scandir(self._tmp):  # writes cut short by a crash; a live process's are left alone
            parts = leftover.name.split(".")
            tag = parts[1] if len(parts) >= 3 else ""
            if tag and tag != self.tag and (tag in dead or not self._owner_alive(tag)):
                dead.add(tag)
            elif tag:
                continue
            try:
                os.unlink(leftover.path)
            except OSError:
                pass
        for owner in os.scandir(self._owners):
            tag = owner.name.split(".")[0]
            if tag != self.tag and not self._owner_alive(tag):
                try:
                    os.unlink(owner.path)
                except OSError:
                    pass
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)  # the recount must not interleave with others' counting
        try:
            total = self._rescan()
            os.pwrite(self._usage_fd, struct.pack("<q", total), 0)
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
        self._evict_to(self.capacity)

    def _rescan(self) -> int:
        """Adopt every object file in the directory into this process's index (oldest first); returns the
        directory's total bytes."""
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
        with self._lock:
            # what this process touched keeps its recency over what it only found now
            self._index.reorder([(key, size) for _, key, size in found], list(self._index))
        return sum(size for _, _, size in found)

    # -- paths --------------------------------------------------------------------------------------

    def _path(self, key: ObjectKey) -> Path:
        return self.root / key.chunk.hex()[:2] / f"{key}{SUFFIX}"

    # -- API ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, key: ObjectKey) -> bool:
        if key in self._index:
            return True
        try:  # written by another process since this one started: one stat, on a miss only
            size = os.stat(self._path(key)).st_size
        except OSError:
            return False
        with self._lock:
            if key not in self._index:
                self._index.add(key, size)
        return True

    def load(self, key: ObjectKey, alloc: Callable[[int], MemoryObj | None]) -> tuple[ChunkHeader, MemoryObj] | None:
        """Read and verify an object into memory from ``alloc(payload_nbytes)``; None on miss or corruption."""
        return load_whole(lambda dest: self._read(key, None, dest), alloc)

    def load_heads(self, key: ObjectKey, head_start: int, head_end: int, dest: HeadDest) -> ChunkHeader | None:
        """Heads [head_start, head_end) of the object into ``dest(header)``: one ranged read (RangedLoad)."""
        return self._read(key, (head_start, head_end), dest)

    def _read(self, key: ObjectKey, heads: tuple[int, int] | None, dest: HeadDest) -> ChunkHeader | None:
        if key not in self._index:
            self.stats.misses += 1
            return None
        path = self._path(key)
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
            head = os.pread(fd, _FIRST_READ, 0)
            header = check_header(head, key)
            if len(head) < header.sealed_nbytes:
                head += os.pread(fd, header.sealed_nbytes - len(head), len(head))
            sums = head_sums(header, head)
            if os.fstat(fd).st_size != header.sealed_nbytes + header.payload_nbytes:
                raise ChunkCorrupt("file size does not match its header")
            h0, h1 = heads or (header.head_start, header.head_end)
            if not header.head_start <= h0 < h1 <= header.head_end:
                raise ValueError(f"heads [{h0}, {h1}) are not within the object's [{header.head_start}, {header.head_end})")
            view = dest(header)
            if view is None:
                self.stats.drops += 1
                return None
            first = h0 - header.head_start
            nbytes = (h1 - h0) * header.head_nbytes
            if len(view) != nbytes:
                raise ValueError(f"dest holds {len(view)} bytes for {nbytes} bytes of heads")
            per = header.head_nbytes
            for h in range(h1 - h0):  # each head verified right after it arrives, while it is still in cache
                piece = view[h * per : (h + 1) * per]
                if read_into(fd, piece, header.sealed_nbytes + (first + h) * per) != per:
                    raise ChunkCorrupt("file shorter than its header says")
                verify_heads(header, sums, piece, first + h)
        except ChunkCorrupt as e:
            self.stats.corrupt += 1
            log.warning("lmcache disk tier: %s is corrupt (%s); deleted, treated as a miss", path.name, e)
            self.remove(key)
            return None
        except OSError as e:
            self.stats.errors += 1
            log.warning("lmcache disk tier: read of %s failed: %s", path.name, e)
            return None
        finally:
            os.close(fd)
        with self._lock:
            self._index.touch(key)
        try:
            os.utime(path)  # the LRU order survives restarts
        except OSError:
            pass
        self.stats.hits += 1
        self.stats.bytes_out += nbytes
        return header

    def put(self, key: ObjectKey, header: bytes, payload: memoryview) -> bool:
        if key in self._index:
            return True
        size = len(header) + len(payload)
        if size > self.capacity:
            self.stats.drops += 1
            return False
        final = self._path(key)
        tmp = self._tmp / f"{key}.{self.tag}.{threading.get_ident()}"
        created = False
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
            # the link and its count happen together under the directory lock, so a recount never sees one
            # without the other
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
            try:
                os.link(tmp, final)  # atomic and exclusive: exactly one writer creates the object
                created = True
                total = self._add_usage_locked(size)
            except FileExistsError:
                pass  # another process stored it first: same bytes
            finally:
                fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
            os.unlink(tmp)
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
        try:
            parent_key = ChunkHeader.unpack(header).parent_key
        except ChunkCorrupt:
            parent_key = NO_PARENT
        with self._lock:
            self._index.add(key, size, None if parent_key == NO_PARENT else ObjectKey(parent_key, key.head_start, key.head_end))
        if not created:
            return True
        self.stats.stores += 1
        self.stats.bytes_in += len(payload)
        if total > self.capacity:
            self._evict_to(self.capacity)
        return True

    def _forget(self, key: ObjectKey) -> int | None:
        with self._lock:
            return self._index.pop(key)

    def _unlink(self, key: ObjectKey) -> bool:
        """Delete an object file; its bytes leave the directory's count only if this call deleted it."""
        path = self._path(key)
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)  # the unlink and its count together (see put)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            return False  # gone already: whoever deleted it took its bytes off
        else:
            self._add_usage_locked(-size)
            return True
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def remove(self, key: ObjectKey) -> bool:
        known = self._forget(key) is not None
        return self._unlink(key) or known

    def _evict_to(self, limit: int) -> None:
        rescanned = False
        while self._add_usage(0) > limit:
            with self._lock:  # a prompt's tail leaves before its head (chain_lru)
                victim = self._index.victim()
                if victim is not None:
                    self._index.pop(victim)
            if victim is None:
                if rescanned:
                    return  # nothing left to evict that this process can see
                self._rescan()  # the rest is other processes' objects: learn them, oldest first
                rescanned = True
                continue
            if self._unlink(victim):
                self.stats.evictions += 1

    def clear(self) -> int:
        keys = list(self._index)
        for key in keys:
            self.remove(key)
        return len(keys)

    def close(self) -> None:
        if self._owner_fd < 0:
            return
        os.close(self._usage_fd)
        os.close(self._dir_fd)
        try:
            os.unlink(self._owners / f"{self.tag}.lock")
        except OSError:
            pass
        os.close(self._owner_fd)
        self._owner_fd = -1
