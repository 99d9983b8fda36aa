"""A real ``lmcache server`` process on loopback ports for the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from redisutil import free_port


class ServerProcess:
    def __init__(self, *extra: str, port: int | None = None, http_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.output = ""

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "ServerProcess":
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache.cli.main", "server", "--port", str(self.port), "--http-port", str(self.http_port),
             "--chunk-size", "16", "--cpu-size-gb", "0.05", *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                self.http("GET", "/health", auth=False)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def secret(self) -> str:
        """The server's local secret (readable by its user only)."""
        with open(f"/dev/shm/lmcache-{self.port}.key") as f:
            return f.read().strip()

    def http(self, method: str, path: str, body=None, headers=None, auth: bool = True):
        """A request; with ``auth`` (and no Authorization given) it carries the local secret, as the
        server's own user may."""
        data = None if body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if auth and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.secret()}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return json.loads(raw) if r.headers.get("Content-Type", "").startswith("application/json") else raw.decode()

    def status(self, field: str) -> int:
        """A number from the server process's /proc status (VmRSS in kB, Threads)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.output = self.proc.stdout.read()
        self.proc = None
        return code
