"""The vLLM connector driven by vLLM's real scheduler (see vllmutil), KV checked bit for bit."""

from __future__ import annotations

import pytest
from vllmutil import CpuVllm, vllm_config, write_model_dir  # noqa: E402  (skips when vllm is absent)

from lmcache.core import shared

CS = 32  # chunk size: 2 vLLM blocks of 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True)
def fresh_pool():
    shared.close_all()  # every test starts with an empty in-process cache
    yield
    shared.close_all()


def extra(**kw):
    return {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05, **{f"lmcache.{k}": v for k, v in kw.items()}}


def prompt(n, seed=1):
    return [(seed * 131 + i * 17) % 997 + 3 for i in range(n)]


def test_second_engine_loads_what_the_first_stored(model_dir):
    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(200))
    a.run()
    stats = a.workers[0].connector._worker.stats
    assert stats.saved_chunks == 200 // CS  # full chunks of the prompt only
    # a fresh vLLM (empty GPU prefix cache) in the same process: the pool survives it
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("B", prompt(150) + [5, 6, 7])  # shares A's first 150 tokens
    first = b.step()
    new = first.output.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 128  # 4 full shared chunks; chunk 5 differs at token 150
    w = b.workers[0].connector._worker
    assert w.stats.loaded_tokens == 128 and not first.load_errors
    b.run()  # every step checks that all earlier tokens hold exactly the expected KV


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"])
def test_every_vllm_layout_round_trips(model_dir, layout):
    a = CpuVllm(vllm_config(model_dir, extra()), layout=layout)
    a.add("A", prompt(100))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra()), layout="LBNHC" if layout != "LBNHC" else "BHLNC")
    b.add("B", prompt(100))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 96
    b.run()


def test_vllm_prefix_hit_first_then_ours_for_the_rest(model_dir):
    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(200))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("C", prompt(56) + [1, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # B's own prefix cache gets 3 blocks (48 tokens)
    b.run()
    w = b.workers[0].connector._worker
    before = w.stats.loaded_tokens
    b.add("D", prompt(200) + [9])
    first = b.step()
    new = first.output.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 192  # 48 from vLLM's prefix cache, 144 loaded by lmcache
    assert w.stats.loaded_tokens - before == 144  # chunk 1 (tokens 32..63) only partly: 48..63
    b.run()
    b.assert_no_leaks()


def test_whole_prompt_cached_still_leaves_last_token_to_vllm(model_dir):
    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(128))  # exactly 4 chunks
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("B", prompt(128))
    first = b.step()
    assert first.output.scheduled_new_reqs[0].num_computed_tokens == 96  # not 128: vLLM computes token 127
    assert first.output.num_scheduled_tokens["B"] == 32
    b.run()


def test_chunked_prefill_saves_each_chunk_once_as_it_completes(model_dir):
    a = CpuVllm(vllm_config(model_dir, extra(), budget=48))  # prefill in steps of 48 tokens
    a.add("A", prompt(200))
    steps = a.run()
    w = a.workers[0].connector._worker
    assert w.stats.saved_chunks == 6 and w.stats.existing_chunks == 0
    assert len(steps) >= 5
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("B", prompt(200))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    b.run()


def test_abort_mid_prefill_leaks_nothing_and_keeps_finished_chunks(model_dir):
    from vllm.v1.request import RequestStatus

    a = CpuVllm(vllm_config(model_dir, extra(), budget=64))
    a.add("A", prompt(300))
    a.step()
    a.step()  # 128 tokens computed: 4 chunks saved
    a.scheduler.finish_requests("A", RequestStatus.FINISHED_ABORTED)
    a.assert_no_leaks()
    assert a.workers[0].connector._worker.stats.saved_chunks == 4
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("B", prompt(300))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 128
    b.run()
    b.assert_no_leaks()


def test_preempted_requests_resume_correctly(model_dir):
    # 24 blocks of 16 tokens for two requests that each grow to ~13 blocks: vLLM must preempt one
    a = CpuVllm(vllm_config(model_dir, extra()), num_blocks=25)
    a.add("X", prompt(150, seed=3), max_tokens=150)  # grows into Y's freed prefix-cache blocks
    a.add("Y", prompt(150, seed=4), max_tokens=50)
    steps = a.run(max_steps=400)
    preempted = set().union(*(s.output.preempted_req_ids or set() for s in steps))
    assert preempted, "the test setup did not cause a preemption"
    loads = a.workers[0].connector._worker.stats.loaded_tokens
    assert loads > 0  # the resumed request took its prompt from lmcache
    a.assert_no_leaks()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_chunk_lost_between_lookup_and_load(model_dir, policy):
    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(200))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra(), policy=policy))
    b.add("B", prompt(200))
    engine = b.workers[0].connector._worker.engine
    blocks = []

    def lose_chunks(so):  # the chunks vanish after the lookup, before the load
        blocks.extend(b.block_ids("B"))
        engine.clear()

    first = b.step(before_load=lose_chunks)
    assert first.output.scheduled_new_reqs[0].num_computed_tokens == 192
    assert first.load_errors == set(blocks[:12])  # exactly the blocks of the load
    if policy == "recompute":
        b.run()  # recomputed from the first failed block; every step re-checks the KV
        b.assert_no_leaks()
    else:
        b.run(check=False)
        b.assert_no_leaks()  # vLLM failed the request; nothing leaked


@pytest.fixture
def server():
    from lmcache.server.launch import ChildServer

    s = ChildServer(CS, 0.1)
    yield s
    s.stop()


def test_mp_mode_with_tensor_parallel_shards(model_dir, server):
    cfg = extra(mode="mp", server_url=server.url)
    a = CpuVllm(vllm_config(model_dir, cfg, tp=2))
    assert [w.head_start for w in a.workers] == [0, 1]  # each rank holds one of the 2 KV heads
    a.add("A", prompt(200))
    a.run()
    assert [w.connector._worker.stats.saved_chunks for w in a.workers] == [6, 6]
    b = CpuVllm(vllm_config(model_dir, cfg, tp=2))
    b.add("B", prompt(200))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    b.run()  # both shards loaded, bit-exact
    # a TP=1 engine (all heads) is served by the two half-shards side by side (the server assembles them)
    c = CpuVllm(vllm_config(model_dir, extra(mode="mp", server_url=server.url)))
    c.add("C", prompt(200))
    assert c.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    c.run()  # every loaded byte checked against the model's KV for all heads


def test_stock_kv_offloading_backend_flag_uses_this_package(model_dir, server, monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector import LMCacheMPConnector

    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector as Ours

    assert LMCacheMPConnector is Ours  # vLLM preferred the class this package ships
    host, port = server.url.rsplit(":", 1)
    cfg = vllm_config(model_dir, {"lmcache.mp.host": host, "lmcache.mp.port": int(port), "lmcache.chunk_size": CS},
                      connector="LMCacheMPConnector", module=None)
    a = CpuVllm(cfg)
    assert isinstance(a.scheduler.connector, Ours) and a.scheduler.connector.config.mode == "mp"
    a.add("A", prompt(100))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra(mode="mp", server_url=server.url)))  # the other flag style, same pool
    b.add("B", prompt(100))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 96
    b.run()


def test_mla_cache_round_trips(model_dir):
    a = CpuVllm(vllm_config(model_dir, extra()), mla=True)
    assert a.workers[0].connector.view.geometry.kind == "mla"
    a.add("A", prompt(100))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra()), mla=True, layout="BLNHC")
    b.add("B", prompt(100))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 96
    b.run()


def test_kv_events_reach_vllms_event_publisher(model_dir):
    from vllm.distributed.kv_events import BlockStored

    a = CpuVllm(vllm_config(model_dir, extra(), events=True))
    recorder = _Recorder.attach(a)  # where vLLM hands its KV event batches (the ZMQ publisher's place)
    req = a.add("A", prompt(200))
    a.run()
    events = [e for b in recorder.batches for e in b.events]
    cpu = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
    assert len(cpu) == 6  # one event per stored chunk, next to vLLM's own GPU-medium events
    assert any(isinstance(e, BlockStored) and e.medium == "GPU" for e in events)
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    ext = [maybe_convert_block_hash(h) for h in req.block_hashes]  # vLLM's own block hashes, as vLLM publishes them
    assert [h for e in cpu for h in e.block_hashes] == ext[:12]
    assert cpu[1].parent_block_hash == ext[1] and cpu[0].parent_block_hash is None
    assert cpu[0].token_ids == prompt(200)[:CS] and cpu[0].block_size == 16


class _Recorder:
    @staticmethod
    def attach(engine):
        from vllm.distributed.kv_events import EventPublisher

        class Recorder(EventPublisher):
            def __init__(self):
                super().__init__(0)
                self.batches = []

            def publish(self, events):
                self.batches.append(events)

            def shutdown(self):
                pass

        engine.scheduler.kv_event_publisher = r = Recorder()
        return r


def test_cpu_evictions_are_announced_with_the_move_to_disk(model_dir, tmp_path):
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    # 8 KiB chunks in a ~420 KiB pool: ten more prompts push the first one's chunks to disk
    a = CpuVllm(vllm_config(model_dir, extra(max_cpu_size_gb=0.0004, local_disk_path=str(tmp_path / "disk")),
                            events=True))
    rec = _Recorder.attach(a)
    first = a.add("A", prompt(200, seed=1))
    a.run()
    a.workers[0].connector._worker.engine.flush()  # A's chunks reached the disk tier
    for seed in range(2, 12):
        a.add(f"R{seed}", prompt(200, seed=seed))
        a.run()
    events = [e for b in rec.batches for e in b.events]
    a_hashes = {maybe_convert_block_hash(h) for h in first.block_hashes[:12]}
    removed = {h for e in events if isinstance(e, BlockRemoved) and e.medium == "CPU" for h in e.block_hashes}
    on_disk = {h for e in events if isinstance(e, BlockStored) and e.medium == "STORAGE" for h in e.block_hashes}
    assert a_hashes <= removed and a_hashes <= on_disk  # A left the CPU tier for the disk tier, and said so
    assert on_disk <= removed  # (a chunk whose disk write was dropped under back-pressure is only removed)
    # and the chunks announced on disk really load: a fresh engine gets A's prompt from the disk tier
    b = CpuVllm(vllm_config(model_dir, extra(max_cpu_size_gb=0.0004, local_disk_path=str(tmp_path / "disk"))))
    b.add("A2", prompt(200, seed=1))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    b.run()


ENGINE_PROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
from vllmutil import CpuVllm, vllm_config
extra = {extra!r}
e = CpuVllm(vllm_config({model_dir!r}, extra))
e.add("R", {prompt!r})
first = e.step()
e.run()
e.close()  # flushes the write-back to the remote tier
print(json.dumps({{"computed": first.output.scheduled_new_reqs[0].num_computed_tokens,
                  "saved": e.workers[0].connector._worker.stats.saved_chunks}}))
"""


def test_two_vllm_processes_share_chunks_through_redis(model_dir, redis_server):
    import json
    import os
    import subprocess
    import sys

    cfg = extra(remote_url=redis_server.url)

    def engine_process(p):
        code = ENGINE_PROCESS.format(tests=os.path.dirname(__file__), extra=cfg, model_dir=model_dir, prompt=p)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = engine_process(prompt(200))
    assert first == {"computed": 0, "saved": 6}
    second = engine_process(prompt(200))  # another process: its CPU tier is empty, Redis has the chunks
    assert second == {"computed": 192, "saved": 0}  # and every loaded byte was checked in that process


def test_hybrid_kv_cache_groups_are_refused_with_the_flag_to_add(model_dir):
    import torch
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    from lmcache.adapters.vllm.model import UnsupportedModel

    kw = dict(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float16)
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], FullAttentionSpec(**kw)),
              KVCacheGroupSpec(["model.layers.1.self_attn.attn"], SlidingWindowSpec(**kw, sliding_window=64))]
    cfg = vllm_config(model_dir, extra())
    with pytest.raises(UnsupportedModel, match="--disable-hybrid-kv-cache-manager"):
        KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups))


def test_chunk_size_not_a_multiple_of_the_block_size_is_refused(model_dir):
    with pytest.raises(ValueError, match="chunk_size 40 is not a multiple of vLLM's block size 16"):
        CpuVllm(vllm_config(model_dir, {"lmcache.chunk_size": 40}))


def test_unknown_lmcache_key_in_extra_config_is_named(model_dir):
    with pytest.raises(ValueError, match="lmcache.chunk_sise"):
        CpuVllm(vllm_config(model_dir, {"lmcache.chunk_sise": 32}))


@pytest.mark.parametrize("mode", ["inproc", "mp"])
def test_layerwise_load_waits_per_layer_and_frees_its_chunks(model_dir, server, mode):
    """layerwise_load: start_load_kv queues the loads, each layer's wait_for_layer_load (as vLLM's attention
    layers call it) comes before that layer's KV is used, and the chunks are let go after the forward."""
    kw = {"layerwise_load": True} if mode == "inproc" else {"layerwise_load": True, "mode": "mp",
                                                            "server_url": server.url}
    a = CpuVllm(vllm_config(model_dir, extra(**kw)))
    a.add("A", prompt(200))
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra(**kw)), layout="BLNHC")
    b.add("B", prompt(200))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 192  # loaded, then checked bit-exact
    worker = b.workers[0].connector._worker
    assert worker._inflight == [] and worker.stats.loaded_tokens == 192
    b.run()
    if mode == "inproc":
        engine = worker.engine
        assert engine.clear() == 6 and engine.stack.cpu.pool.stats()["used"] == 0  # no chunk still held by a load


def test_lmcache_figures_reach_vllms_scheduler_stats_and_prometheus(model_dir):
    """Through vLLM's KV-connector stats interface: worker -> vLLM's output aggregator -> scheduler stats
    -> vLLM's own Prometheus logger (its metric classes, its engine labels)."""
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from lmcache.adapters.vllm import LMCacheConnector

    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(200))
    stored = sum(r.scheduler_stats.kv_connector_stats.get("stored_tokens", 0) for r in a.run()
                 if r.scheduler_stats is not None and r.scheduler_stats.kv_connector_stats)
    assert stored == 192  # the full chunks of the prompt, reported once
    b = CpuVllm(vllm_config(model_dir, extra()))
    b.add("B", prompt(150) + [5, 6, 7])
    first = b.step()
    data = first.scheduler_stats.kv_connector_stats
    assert data["loaded_tokens"] == 128 and data["load_seconds"] > 0
    stats = LMCacheConnector.build_kv_connector_stats(data)
    assert stats.reduce()["lmcache_loaded_tokens"] == 128 and not stats.is_empty()
    registry = CollectorRegistry()  # vLLM passes its metric classes; these register in a registry of the test's
    kinds = {kind: functools.partial(kind, registry=registry) for kind in (Gauge, Counter, Histogram)}
    prom = LMCacheConnector.build_prom_metrics(b.config, kinds, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(data, engine_idx=0)
    assert registry.get_sample_value("vllm:lmcache_loaded_tokens_total", {"model_name": "m", "engine": "0"}) == 128
    b.run()


def test_a_connector_reset_never_loads_what_was_cached_before(model_dir):
    """vLLM's reset_prefix_cache(reset_connector=True) - what its engine core runs when generation pauses for a
    weight update - makes this engine's earlier chunks unloadable; what it stores afterwards hits again, and an
    engine that was not reset still uses the old ones."""
    a = CpuVllm(vllm_config(model_dir, extra()))
    a.add("A", prompt(200))
    a.run()
    assert a.scheduler.reset_prefix_cache(reset_connector=True)  # vLLM's own call path into reset_cache()
    a.add("B", prompt(200))
    assert a.step().output.scheduled_new_reqs[0].num_computed_tokens == 0  # nothing from before the reset
    a.run()
    assert a.scheduler.reset_prefix_cache(reset_connector=False)  # vLLM's cache only: ours is reached again
    a.add("C", prompt(200))
    assert a.step().output.scheduled_new_reqs[0].num_computed_tokens == 192  # stored after the reset, exact
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra()))  # another engine, same pool, never reset
    b.add("D", prompt(200))
    assert b.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    b.run()
