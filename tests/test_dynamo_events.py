"""lmcache's KV events for Dynamo's KV-aware router, consumed by Dynamo's own indexer process.

A vLLM engine (vLLM's real scheduler, see vllmutil) with ``router_events: dynamo`` stores a prompt in the
CPU tier; Dynamo's standalone indexer, subscribed to lmcache's endpoint, then scores that worker for a
request sharing the prefix, per tier; evictions to disk move the score from CPU to disk.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest
from dynamoutil import DynamoIndexer, free_port  # noqa: E402  (skips when ai-dynamo is absent)
from hypothesis import given, settings
from hypothesis import strategies as st
from vllmutil import CpuVllm, vllm_config, write_model_dir  # noqa: E402  (skips when vllm is absent)

from lmcache.adapters.dynamo.events import DynamoEventPublisher, local_block_hashes, sequence_hashes
from lmcache.core import shared
from lmcache.core.config import LMCacheConfig
from lmcache.core.plugins import open_router_events

CS, BS, WORKER = 32, 16, 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True)
def fresh_pool():
    shared.close_all()
    yield
    shared.close_all()


def prompt(n, seed=1):
    return [(seed * 131 + i * 17) % 997 + 3 for i in range(n)]


def engine_with_router(model_dir, endpoint, **kw):
    extra = {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05, "lmcache.router_events": "dynamo",
             "lmcache.router_events_endpoint": endpoint, **{f"lmcache.{k}": v for k, v in kw.items()}}
    engine = CpuVllm(vllm_config(model_dir, extra))
    router = engine.scheduler.connector._router
    assert isinstance(router, DynamoEventPublisher) and router.block_size == BS
    return engine, router


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.sampled_from([1, 16, 32, 64]))
def test_block_hashes_are_the_ones_dynamos_router_computes(tokens, block_size):
    from dynamo.llm import compute_block_hash_for_seq

    assert local_block_hashes(tokens, block_size) == compute_block_hash_for_seq(tokens, block_size)


def test_sequence_hashes_chain_and_are_signed_int64():
    tokens = prompt(64)
    local = local_block_hashes(tokens, BS)
    whole = sequence_hashes(local, None)
    assert whole[0] % 2**64 == local[0]  # the first block's sequence hash is its local hash
    assert sequence_hashes(local[2:], whole[1]) == whole[2:]  # continuing from a parent = hashing it all
    assert all(-(2**63) <= h < 2**63 for h in whole) and any(h < 0 for h in sequence_hashes(
        local_block_hashes(list(range(4096)), BS), None))


def test_dynamos_indexer_scores_the_worker_holding_the_prefix_in_lmcache(model_dir):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    engine, router = engine_with_router(model_dir, endpoint)
    indexer = DynamoIndexer(BS, {WORKER: endpoint})
    try:
        assert router.wait_for_subscriber(30), "Dynamo's indexer never subscribed to lmcache's endpoint"
        engine.add("A", prompt(200))
        engine.run()
        # a new request sharing the prompt's first 192 tokens (6 chunks stored), then going elsewhere
        request = prompt(200)[:192] + prompt(50, seed=9)
        got = indexer.wait_for(request, lambda r: r.get(WORKER, {}).get("cpu") == 192)
        assert got[WORKER]["gpu"] == 0  # only lmcache spoke: these are CPU-tier blocks, not GPU ones
        assert got[WORKER]["longest_matched"] == 192
        # a request sharing only the first chunk matches only that much; an unrelated one nothing
        assert indexer.query(prompt(32) + prompt(100, seed=5))[WORKER]["cpu"] == 32
        assert indexer.query(prompt(200, seed=4)).get(WORKER, {}).get("longest_matched", 0) == 0
    finally:
        indexer.close()
        engine.close()


def test_a_salted_prompt_matches_only_requests_with_the_same_salt(model_dir):
    """A request's cache_salt travels with its events, so Dynamo hashes its blocks in the same namespace as
    the router hashes a request carrying that salt, and never as unsalted tokens."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    engine, router = engine_with_router(model_dir, endpoint)
    indexer = DynamoIndexer(BS, {WORKER: endpoint})
    try:
        assert router.wait_for_subscriber(30)
        engine.add("S", prompt(200), cache_salt="tenant-a")
        engine.run()
        got = indexer.wait_for(prompt(200), lambda r: r.get(WORKER, {}).get("cpu") == 192, cache_salt="tenant-a")
        assert got[WORKER]["longest_matched"] == 192
        for other in ({}, {"cache_salt": "tenant-b"}):
            assert indexer.query(prompt(200), **other).get(WORKER, {}).get("longest_matched", 0) == 0
    finally:
        indexer.close()
        engine.close()


def test_evictions_move_the_score_from_cpu_to_disk(model_dir, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # 8 KiB chunks in a ~420 KiB CPU pool: ten more prompts push the first one's chunks to disk
    engine, router = engine_with_router(model_dir, endpoint, max_cpu_size_gb=0.0004,
                                        local_disk_path=str(tmp_path / "disk"))
    indexer = DynamoIndexer(BS, {WORKER: endpoint})
    try:
        assert router.wait_for_subscriber(30)
        engine.add("A", prompt(200, seed=1))
        engine.run()
        first = prompt(200, seed=1)
        indexer.wait_for(first, lambda r: r.get(WORKER, {}).get("cpu") == 192)
        engine.workers[0].connector._worker.engine.flush()  # A's chunks reached the disk tier
        for seed in range(2, 12):
            engine.add(f"R{seed}", prompt(200, seed=seed))
            engine.run()
        # events cross a socket and a thread: wait for the indexer to have them all, then check the final state
        got = indexer.wait_for(first, lambda r: r[WORKER]["cpu"] == 0 and r[WORKER]["disk"] == 192)
        # gone from the CPU tier (from its first chunk on), still whole on disk: Dynamo's disk score is
        # cumulative over faster tiers, so the disk column counts the whole prefix
        assert got[WORKER]["cpu"] == 0 and got[WORKER]["disk"] == 192
        # the newest prompt is still in the CPU tier
        newest = indexer.wait_for(prompt(200, seed=11), lambda r: r.get(WORKER, {}).get("cpu") == 192)
        assert newest[WORKER]["cpu"] == 192
    finally:
        indexer.close()
        engine.close()


def test_mp_mode_announces_the_servers_evictions(model_dir, tmp_path):
    """In mp mode the server evicts; the engine reads the server's eviction log each step and announces
    the chunks it had announced: Dynamo's score moves from the CPU tier to disk as in-process."""
    from lmcache.server.launch import ChildServer

    server = ChildServer(CS, 0.001, "--disk-path", str(tmp_path / "disk"))  # 1 MiB: 128 chunks of 8 KiB
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    engine, router = engine_with_router(model_dir, endpoint, mode="mp", server_url=server.url)
    indexer = DynamoIndexer(BS, {WORKER: endpoint})
    try:
        assert router.wait_for_subscriber(30)
        first = prompt(200, seed=1)
        engine.add("A", first)
        engine.run()
        indexer.wait_for(first, lambda r: r.get(WORKER, {}).get("cpu") == 192)
        for seed in range(2, 26):  # 24 more prompts of 6 chunks push A's chunks out of the server's CPU tier
            engine.add(f"R{seed}", prompt(200, seed=seed))
            engine.run()
        got = indexer.wait_for(first, lambda r: r[WORKER]["cpu"] < 192)
        assert got[WORKER]["cpu"] == 0 and got[WORKER]["disk"] == 192
    finally:
        indexer.close()
        engine.close()
        server.stop()


def test_router_config_errors_are_one_clear_line():
    with pytest.raises(ValueError, match="router_events 'acme' is not registered: .*dynamo"):
        open_router_events(LMCacheConfig().replace(router_events="acme"), BS)
    taken = DynamoEventPublisher("tcp://127.0.0.1:0", BS)
    try:
        with pytest.raises(ValueError, match=f"router_events_endpoint '{taken.endpoint}': cannot bind"):
            DynamoEventPublisher(taken.endpoint, BS)
    finally:
        taken.close()
    with pytest.raises(ValueError, match="block size 0"):
        DynamoEventPublisher("tcp://127.0.0.1:0", 0)


def test_data_parallel_ranks_publish_on_consecutive_ports():
    from lmcache.adapters.vllm.connector import offset_port

    assert offset_port("tcp://*:5558", 0) == "tcp://*:5558"
    assert offset_port("tcp://*:5558", 3) == "tcp://*:5561"
    assert offset_port("ipc:///tmp/ev", 2) == "ipc:///tmp/ev"


def test_vllms_own_event_stream_carries_lmcache_chunks_to_dynamo(model_dir):
    """Without router_events: Dynamo's vLLM worker relays vLLM's KV-event stream (--kv-events-config, as
    'lmcache launch-flags dynamo' prints it); lmcache's chunks are in it as CPU-medium blocks, which Dynamo
    files under its host-pinned tier next to vLLM's GPU blocks, for the same worker."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    port = free_port()
    extra = {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05}
    engine = CpuVllm(vllm_config(model_dir, extra, events=f"tcp://*:{port}"))  # vLLM's real ZmqEventPublisher
    indexer = DynamoIndexer(BS, {WORKER: f"tcp://127.0.0.1:{port}"})
    try:
        for attempt in range(50):  # a PUB drops what it sends before the subscriber has joined
            warm = prompt(16, seed=100 + attempt)
            engine.add(f"warm{attempt}", warm)
            engine.run()
            try:
                indexer.wait_for(warm, lambda r: r.get(WORKER, {}).get("gpu") == 16, timeout_s=0.5)
                break
            except AssertionError:
                continue
        req = engine.add("A", prompt(200))
        engine.run()
        blocks = {maybe_convert_block_hash(h) % 2**64 for h in req.block_hashes[:12]}
        deadline = time.monotonic() + 20
        while not blocks <= indexer.tier_blocks(WORKER).get("host_pinned", set()):
            assert time.monotonic() < deadline, indexer.tier_blocks(WORKER)
            time.sleep(0.1)
        assert blocks <= indexer.tier_blocks(WORKER)["device"]  # vLLM's own GPU blocks, same worker
    finally:
        indexer.close()
        engine.close()


def test_dynamo_vllm_line_is_accepted_by_dynamos_own_worker_parser(model_dir):
    from dynamo.vllm.args import parse_args

    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "launch-flags", "dynamo", "--engine", "vllm",
                        "--model", model_dir, "--set", "chunk_size=32", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(json.loads(r.stdout)["commands"][-1]["command"])
    assert argv[:3] == ["python", "-m", "dynamo.vllm"]
    config = parse_args(argv[3:])  # what `python -m dynamo.vllm` does with its command line
    kt = config.engine_args.kv_transfer_config
    assert (kt.kv_connector, kt.kv_connector_module_path) == ("LMCacheConnector", "lmcache.adapters.vllm")
    assert kt.kv_connector_extra_config == {"lmcache.chunk_size": 32}
    assert config.use_kv_events and config.engine_args.kv_events_config.publisher == "zmq"


class DynamoDeployment:
    """tests/dynamo_router.py in a child process: two Dynamo workers and Dynamo's KV router."""

    def __init__(self, zmq_endpoint: str, block_size: int, discovery_dir) -> None:
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "dynamo_router.py"), zmq_endpoint,
                                      str(block_size), str(discovery_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), f"the Dynamo deployment did not start: {line!r}"
        self.ids = json.loads(line[6:])

    def ask(self, tokens: list[int]) -> dict:
        self.proc.stdin.write(json.dumps(tokens) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_dynamos_kv_router_routes_to_the_worker_whose_lmcache_holds_the_prefix(model_dir, tmp_path):
    """Dynamo's runtime (file discovery, ZMQ event plane), two workers, Dynamo's KvRouter: the worker whose
    relay carries lmcache's events is scored for the prompt's blocks in its host-pinned tier and chosen."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    engine, router = engine_with_router(model_dir, endpoint)
    deployment = DynamoDeployment(endpoint, BS, tmp_path / "discovery")
    try:
        assert router.wait_for_subscriber(30), "Dynamo's KvEventPublisher never subscribed to lmcache's endpoint"
        engine.add("A", prompt(200))
        engine.run()
        request = prompt(200)[:192] + prompt(40, seed=9)
        ours, plain = str(deployment.ids["lmcache"]), str(deployment.ids["plain"])
        deadline = time.monotonic() + 20
        while True:
            got = deployment.ask(request)
            if got["workers"].get(ours, {}).get("host_pinned_blocks") == 12 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got["workers"][ours]["host_pinned_blocks"] == 12  # 192 tokens in 16-token blocks
        assert got["workers"][ours]["device_blocks"] == 0
        assert got["workers"].get(plain, {}).get("host_pinned_blocks", 0) == 0
        assert got["best"][0] == deployment.ids["lmcache"]  # the router sends the request where the prefix is
        unrelated = deployment.ask(prompt(200, seed=4))
        assert unrelated["workers"].get(ours, {}).get("host_pinned_blocks", 0) == 0
    finally:
        deployment.close()
        engine.close()
