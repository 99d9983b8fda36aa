"""Whether a process is alive, told by a lock it holds: the kernel drops a process's ``flock`` when the
process ends, however it ends (SIGKILL included), and a stopped, frozen or swapping process keeps it.
Unlike pids, a lock is never reused by another process and means the same across pid namespaces.
Used by the disk tier (owners of temp files) and by ``lmcache server`` (clients holding leases)."""

from __future__ import annotations

import fcntl
import os


def lock_held(fd: int) -> bool:
    """True while another open file holds an exclusive ``flock`` on the file ``fd`` refers to."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def path_lock_held(path: str | os.PathLike[str]) -> bool:
    """``lock_held`` for a file by path; False when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return lock_held(fd)
    finally:
        os.close(fd)
