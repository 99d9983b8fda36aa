"""Start ``lmcache server`` as a child process on free loopback ports (benchmarks, quick starts)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    def __init__(self, chunk_size: int, cpu_size_gb: float, *extra: str) -> None:
        self.port, self.http_port = _free_port(), _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache.cli.main", "server", "--port", str(self.port), "--http-port",
             str(self.http_port), "--chunk-size", str(chunk_size), "--cpu-size-gb", f"{cpu_size_gb:.3f}",
             # one client (the benchmark) may use the whole pool it was sized for
             "--client-quota-gb", f"{cpu_size_gb:.3f}", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmcache server failed to start: {self.proc.stderr.read().strip()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("lmcache server did not answer within 60 s") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
