"""A minimal RESP2 reader that receives large values straight into the caller's memory.

redis-py builds a ``bytes`` object per reply (the socket's bytes are copied into its buffer, then into
the reply, then we copy them into the pool): three passes over every byte. Here a pipeline of GET /
GETRANGE commands is sent at once and each bulk reply is received with ``recv_into`` directly into its
destination (a slice of pool memory): one pass, and the next reply is already on the wire while this
one lands. Writes go out the same way: a pipeline of SETs sent with ``sendmsg`` from the payload's own
memory. Single-node, plain TCP: a cluster or TLS URL keeps the redis-py path.

One connection per thread (the engine's thread and the prefetch thread read concurrently). Any socket
or protocol error closes that connection and raises ``RespError``; the next call reconnects.
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

_CRLF = b"\r\n"


class RespError(OSError):
    """The server could not be reached, answered with an error, or broke the protocol."""


@dataclass(frozen=True)
class RespAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    timeout: float


class _Conn:
    def __init__(self, addr: RespAddress) -> None:
        self.sock = socket.create_connection((addr.host, addr.port), timeout=addr.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        hello = []
        if addr.password:
            hello.append(_command(b"AUTH", *([addr.username.encode()] if addr.username else []), addr.password.encode()))
        if addr.db:
            hello.append(_command(b"SELECT", str(addr.db).encode()))
        if hello:
            self.sock.sendall(b"".join(hello))
            for _ in hello:
                line = self.line()
                if not line.startswith(b"+"):
                    raise RespError(f"redis refused the connection set-up: {line[:200].decode(errors='replace')}")

    def usable(self) -> bool:
        """Still open at the other end, with no stray bytes waiting (one non-blocking peek)."""
        if self.buf:
            return False
        try:
            # readable while idle means EOF or stray bytes (a socket with a timeout would wait in recv: poll first)
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RespError("connection closed by the server")
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            end = self.buf.find(_CRLF)
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return out
            self._fill()

    def bulk_into(self, dest: memoryview | None) -> int:
        """Receive one reply: a bulk string into ``dest`` when it is exactly ``len(dest)`` long (its length is
        returned; -1: nil); a reply of another length is received and dropped (its length returned)."""
        return self.bulk(lambda n: dest if dest is not None and len(dest) == n else None)

    def bulk(self, place: Callable[[int], memoryview | None]) -> int:
        """Receive one bulk reply into ``place(length)`` (None: receive and drop it); its length, -1 for nil."""
        head = self.line()
        if head.startswith(b"-"):
            raise RespError(f"redis error: {head[1:200].decode(errors='replace')}")
        if not head.startswith(b"$"):
            raise RespError(f"unexpected reply {head[:40]!r}")
        n = int(head[1:])
        if n < 0:
            return -1
        target = place(n)
        got = min(n, len(self.buf))
        if target is not None:
            target[:got] = self.buf[:got]
        del self.buf[:got]
        while got < n:
            if target is not None:
                r = self.sock.recv_into(target[got:], n - got)
            else:
                r = len(self.sock.recv(min(1 << 20, n - got)))
            if r == 0:
                raise RespError("connection closed mid-reply")
            got += r
        while len(self.buf) < 2:
            self._fill()
        del self.buf[:2]
        return n

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespReader:
    """Pipelined GET / GETRANGE into memoryviews, one connection per thread (see the module docstring)."""

    def __init__(self, addr: RespAddress) -> None:
        self.addr = addr
        self._local = threading.local()
        self._all: list[_Conn] = []
        self._lock = threading.Lock()

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.usable():  # the server closed it (restarted): a fresh one, not an error
            self._drop()
            conn = None
        if conn is None:
            try:
                conn = _Conn(self.addr)
            except OSError as e:
                raise RespError(str(e)) from None
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def get(self, key: bytes) -> bytes | None:
        """One small value as bytes (a header)."""
        conn = self._conn()
        out = bytearray()
        try:
            conn.sock.sendall(_command(b"GET", key))

            def place(n: int) -> memoryview:
                out.extend(bytes(n))
                return memoryview(out)

            return None if conn.bulk(place) < 0 else bytes(out)
        except (OSError, ValueError) as e:
            self._drop()
            raise RespError(str(e)) from None

    def read_into(self, commands: Sequence[tuple[bytes, ...]], dests: list[memoryview]) -> list[int]:
        """Send ``commands`` (GET key / GETRANGE key start end) as one pipeline; reply i lands in ``dests[i]``
        when it has exactly that length. Returns each reply's length (-1: the key does not exist)."""
        conn = self._conn()
        try:
            conn.sock.sendall(b"".join(_command(*c) for c in commands))
            return [conn.bulk_into(d) for d in dests]
        except (OSError, ValueError) as e:
            self._drop()
            raise RespError(str(e)) from None

    def send_all(self, commands: Sequence[tuple[bytes | memoryview, ...]]) -> None:
        """Send ``commands`` as one pipeline, values straight from their memory (no copy into a buffer), and
        require a simple-string reply (+OK) to each."""
        conn = self._conn()
        try:
            pieces: list[bytes | memoryview] = []
            for c in commands:
                pieces.append(b"*%d\r\n" % len(c))
                for a in c:
                    pieces += [b"$%d\r\n" % len(a), a, _CRLF]
            views = [memoryview(p).cast("B") for p in pieces]
            i = 0
            while i < len(views):  # sendmsg may send part of what it is given: go on from where it stopped
                sent = conn.sock.sendmsg(views[i : i + 512])  # within the kernel's iovec limit
                while sent and i < len(views):
                    if sent >= len(views[i]):
                        sent -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0
            for _ in commands:
                line = conn.line()
                if not line.startswith(b"+"):
                    raise RespError(f"redis refused a write: {line[:200].decode(errors='replace')}")
        except (OSError, ValueError) as e:
            self._drop()
            raise RespError(str(e)) from None

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
