"""Real redis-server processes on loopback for the tests: single nodes and a 3-master cluster."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 40000)
        if _port_free(port) and _port_free(port + 10000):
            return port


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, cluster: bool = False, persist: bool = False) -> None:
        self.port = port or (cluster_port() if cluster else free_port())
        self.persist = persist
        self.workdir = workdir
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def start_cluster(workdir: Path, masters: int = 3) -> list[RedisServer]:
    nodes = [RedisServer(workdir, cluster=True).start() for _ in range(masters)]
    subprocess.run([REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                    "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # every node, not only the first: gossip reaches them one by one, and a client may ask any of them
        infos = [redis.Redis(port=n.port, decode_responses=True).cluster("info") for n in nodes]
        if all(i.get("cluster_state") == "ok" and int(i.get("cluster_slots_ok", 0)) == 16384
               and int(i.get("cluster_known_nodes", 0)) == masters for i in infos):
            return nodes
        time.sleep(0.1)
    raise RuntimeError("redis cluster did not reach cluster_state:ok")
