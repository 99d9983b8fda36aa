"""The server's CPU pool in POSIX shared memory, mapped once by every engine process on the host.

The segment is a file under /dev/shm created with mode 0600 (owner only) and a random name; engines
map it read-write by path and move KV bytes in and out of it directly: only offsets cross the socket.
"""

from __future__ import annotations

import mmap
import os
import secrets

import torch

SHM_DIR = "/dev/shm"


class SharedBuffer:
    def __init__(self, path: str, size: int, owner: bool) -> None:
        self.path = path
        self.size = size
        self.owner = owner
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        self._registered = False

    @classmethod
    def create(cls, size: int, tag: str = "") -> "SharedBuffer":
        # tmpfs pages are allocated on first touch: a segment larger than /dev/shm's free space would
        # crash the server (SIGBUS) later, mid-write, instead of failing now with a clear message
        free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
        if size > free:
            raise ValueError(f"the CPU pool ({size / 2**30:.2f} GiB) does not fit in {SHM_DIR} ({free / 2**30:.2f} GiB free): "
                             "lower --cpu-size-gb, or give the container more shared memory (docker --shm-size)")
        path = os.path.join(SHM_DIR, f"lmcache-{tag}{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, owner=True)

    @classmethod
    def attach(cls, path: str, size: int) -> "SharedBuffer":
        if os.path.getsize(path) < size:
            raise ValueError(f"shared pool {path} is smaller than the server says ({size} bytes)")
        return cls(path, size, owner=False)

    def pin_for_accelerator(self) -> bool:
        """Page-lock the mapping for fast DMA on a GPU host (cudaHostRegister); False where unsupported."""
        if self._registered or not torch.cuda.is_available():
            return self._registered
        rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.size, 0)
        self._registered = int(rc) == 0
        return self._registered

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            self._map.close()
        except BufferError:  # views still alive: the mapping goes when they do
            pass
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
