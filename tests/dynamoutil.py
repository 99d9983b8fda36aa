"""Dynamo's own standalone KV indexer (``python -m dynamo.indexer``, from ai-dynamo 1.6.1) as a real
process, subscribed to a worker's ZMQ KV-event endpoint and asked over HTTP which worker holds a prompt."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

from engineutil import require_engine

require_engine("dynamo", ".ci/run installs ai-dynamo and ai-dynamo-runtime 1.6.1 (--no-deps) for these tests")
import dynamo.llm  # noqa: E402,F401  (the runtime package: an import failure here is a failure, not a skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DynamoIndexer:
    """``python -m dynamo.indexer --block-size B --workers WORKER=ENDPOINT``: Dynamo's router indexer."""

    def __init__(self, block_size: int, workers: dict[int, str]) -> None:
        self.port = free_port()
        spec = ",".join(f"{w}={ep}" for w, ep in workers.items())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.indexer", "--block-size", str(block_size), "--port", str(self.port),
             "--workers", spec, "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dynamo.indexer did not start:\n{self.log()}") from None
                time.sleep(0.1)

    def query(self, token_ids: list[int], **namespace) -> dict:
        """{worker id: {"longest_matched", "gpu", "cpu", "disk"}} for a request with these tokens (and
        ``lora_name`` / ``cache_salt``)."""
        body = json.dumps({"token_ids": token_ids, "model_name": "default", **namespace}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/query", data=body,
                                     headers={"Content-Type": "application/json"})
        return {int(k): v for k, v in json.loads(urllib.request.urlopen(req, timeout=10).read())["instances"].items()}

    def tier_blocks(self, worker: int) -> dict[str, set[int]]:
        """Dynamo's dump of its index: {storage tier: block hashes} that ``worker`` holds."""
        raw = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/dump", timeout=10).read())
        tiers: dict[str, set[int]] = {}
        for model in raw.values():
            for e in model["events"]:
                stored = e["event"]["data"].get("stored")
                if e["worker_id"] == worker and stored:
                    tiers.setdefault(e["storage_tier"], set()).update(b["block_hash"] for b in stored["blocks"])
        return tiers

    def wait_for(self, token_ids: list[int], check, timeout_s: float = 20.0, **namespace) -> dict:
        """Query until ``check(result)`` holds (events cross a socket and a thread), or fail with the last."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.query(token_ids, **namespace)
            if check(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"Dynamo's indexer never got there; last answer {got}\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stdout.read().decode(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
