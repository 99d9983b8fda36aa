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
