"""Who may talk to ``lmcache server`` on this host, and whether a client is still alive.

Trust model (README "MP mode: trust model"): the server admits a client that proves it runs as the
server's own user, or that presents the server's token. Proof of the user is the *local secret*: random
bytes the server writes at start into ``/dev/shm/lmcache-<port>.key`` (mode 0600, so only its user and
root can read it). Such a client could read and write the shared pool directly anyway (the segment has
the same owner and mode), so nothing is lost by trusting it; another local user can read neither file,
so it can neither map the pool nor pass the socket's check, and gets no bytes and no leases.

The same file is the server's liveness lock: the server holds an exclusive ``flock`` on it for its whole
life, so a restarted server on the same port can tell a dead predecessor (lock free: its segments are
removed) from a live one (lock held: refused), without trusting pids, which are reused and namespaced.

Clients prove liveness the same way: each holds an ``flock`` on its own file
(``/dev/shm/lmcache-client-<random>.lock``) and names it in ``hello``. The kernel drops the lock when the
process dies, however it dies; a stopped (SIGSTOP), frozen or swapping process keeps it. So the server
never reuses memory leased to a client that might still copy into or out of it: a lease outlives its
timeout as long as its client lives, and only a per-client quota bounds what a stalled client can hold.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import re
import secrets
from dataclasses import dataclass

from lmcache.core.liveness import lock_held

SHM_DIR = "/dev/shm"
_CLIENT_LOCK = re.compile(r"^lmcache-client-[0-9a-f]{16}\.lock$")


def key_path(port: int) -> str:
    return os.path.join(SHM_DIR, f"lmcache-{port}.key")


def tokens_equal(given: object, expected: str) -> bool:
    """Constant-time comparison (no timing oracle on the secret); False for anything not a string."""
    return isinstance(given, str) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class ServerAlreadyRunning(OSError):
    pass


@dataclass
class ServerKey:
    """The server's side: its lock file (held while it lives) and the local secret written in it."""

    path: str
    secret: str
    fd: int

    @classmethod
    def claim(cls, port: int) -> "ServerKey":
        """Take the port's key file: refuse when a live server holds it or another user owns it."""
        path = key_path(port)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise ServerAlreadyRunning(f"{path} belongs to uid {st.st_uid}, not this user ({os.geteuid()}): another "
                                           "user's server uses this port; pick another --port, or remove that file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ServerAlreadyRunning(f"another lmcache server is running on port {port} (it holds {path}); "
                                           "stop it or pick another --port") from None
            os.fchmod(fd, 0o600)
            secret = secrets.token_hex(32)
            os.ftruncate(fd, 0)
            os.pwrite(fd, secret.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, secret, fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # unlink while still holding the lock: a successor never sees our secret
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def stale_segments(port: int) -> list[str]:
    """This user's pool segments of port ``port`` (call only while holding the port's key: then their
    server is dead)."""
    prefix = f"lmcache-{port}-"
    out = []
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            path = os.path.join(SHM_DIR, name)
            try:
                if os.lstat(path).st_uid == os.geteuid():
                    out.append(path)
            except FileNotFoundError:
                pass
    return out


def read_local_secret(port: int) -> str:
    """The local secret of the server on ``port``, or "" when this process cannot read it (another user,
    another container, no such server)."""
    try:
        with open(key_path(port), "rb") as f:
            return f.read(128).decode("ascii", "replace").strip()
    except OSError:
        return ""


class ClientLock:
    """A client's liveness lock: held from creation until ``close`` or the process's death."""

    def __init__(self) -> None:
        self.path = os.path.join(SHM_DIR, f"lmcache-client-{secrets.token_hex(8)}.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


class LivenessProbe:
    """The server's view of one client's lock: ``alive()`` is True while the client holds it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, path: object) -> "LivenessProbe | None":
        """A probe for a lock the client names in hello; None unless it is a client lock held right now."""
        if not isinstance(path, str) or os.path.dirname(path) != SHM_DIR or not _CLIENT_LOCK.match(os.path.basename(path)):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        probe = cls(fd, path)
        if not probe.alive():
            probe.close(unlink=False)
            return None
        return probe

    def alive(self) -> bool:
        return self.fd >= 0 and lock_held(self.fd)  # the client holds its exclusive lock while it lives

    def close(self, unlink: bool) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if unlink:  # the client died without removing its file
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


def stale_client_locks() -> list[str]:
    """Client lock files nobody holds (their processes died)."""
    out = []
    for name in os.listdir(SHM_DIR):
        if _CLIENT_LOCK.match(name):
            probe = LivenessProbe.open(os.path.join(SHM_DIR, name))
            if probe is None:
                out.append(os.path.join(SHM_DIR, name))
            else:
                probe.close(unlink=False)
    return out
