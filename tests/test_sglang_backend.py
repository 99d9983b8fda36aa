"""The SGLang HiCache backend through SGLang's own factory, config and page hashes; bytes checked exactly."""

from __future__ import annotations

import pytest
import torch
from sglangutil import HostPool, StorageBackendFactory, batch_exists, make_backend, page_keys  # noqa: E402,F401

from lmcache.core import shared

PS = 32


@pytest.fixture(autouse=True)
def fresh_pool():
    shared.close_all()
    yield
    shared.close_all()


def extra(**kw):
    return {"lmcache.chunk_size": PS, "lmcache.max_cpu_size_gb": 0.05, **{f"lmcache.{k}": v for k, v in kw.items()}}


def tokens(n, seed=1):
    return [(seed * 131 + i * 17) % 997 + 3 for i in range(n)]


def kv_of(tokens_, positions, layers, heads, row):
    from vllmutil import expected_kv  # the same stand-in model the vLLM tests use

    return expected_kv(torch.as_tensor(tokens_), torch.as_tensor(positions), layers, heads, row)


def fill(pool: HostPool, toks, host_start):
    row = pool.head_dim * (1 if pool.mla else 2)
    kv = kv_of(toks, range(len(toks)), pool.layer_num, pool.head_num, row)
    for i in range(len(toks)):
        pool.set_token_kv(host_start + i, kv[i])
    return kv


def read(pool: HostPool, host_start, n):
    return torch.stack([pool.token_kv(host_start + i) for i in range(n)])


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_v1_round_trip_every_host_layout(layout, mla):
    pool = HostPool(layout, PS, pages=16, layers=2, heads=2, head_dim=16, mla=mla)
    backend = make_backend(extra(), pool)
    toks = tokens(160)  # 5 pages
    keys = page_keys(toks, PS)
    want = fill(pool, toks, host_start=2 * PS)
    assert batch_exists(backend, keys) == 0
    assert backend.batch_set_v1(keys, torch.arange(2 * PS, 7 * PS)) == [True] * 5
    assert batch_exists(backend, keys) == 5
    assert batch_exists(backend, page_keys(tokens(160, seed=2), PS)) == 0
    got = backend.batch_get_v1(keys, torch.arange(9 * PS, 14 * PS))  # into other host pages
    assert got == [True] * 5
    assert torch.equal(read(pool, 9 * PS, 160).view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_legacy_flat_page_path(layout):
    pool = HostPool(layout, PS, pages=8, layers=2, heads=2, head_dim=16)
    backend = make_backend(extra(), pool)
    toks = tokens(64)
    keys = page_keys(toks, PS)
    want = fill(pool, toks, host_start=0)
    # as SGLang's controller writes without zero copy: flat data pages of its host pool
    assert backend.batch_set(keys, [pool.get_data_page(i * PS) for i in range(2)])
    assert backend.exists(keys[1]) and not backend.exists(page_keys(tokens(64, 9), PS)[0])
    pages = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    for i, page in enumerate(pages):
        pool.set_from_flat_data_page((4 + i) * PS, page)
    assert torch.equal(read(pool, 4 * PS, 64).view(torch.int16), want.view(torch.int16))


def test_page_size_must_equal_chunk_size():
    pool = HostPool("layer_first", 64, pages=4, layers=2, heads=2, head_dim=16)
    with pytest.raises(ValueError, match="--page-size 64 differs from lmcache chunk_size 32"):
        make_backend(extra(), pool)


def test_keys_are_lmcache_keys_of_the_same_tokens():
    from lmcache.core.keys import ChunkHasher

    pool = HostPool("layer_first", PS, pages=4, layers=2, heads=2, head_dim=16)
    backend = make_backend(extra(), pool)
    toks = tokens(100)
    assert backend._keys(page_keys(toks, PS)) == ChunkHasher(backend.engine.identity, PS).keys(toks)


def test_printed_sglang_line_is_accepted_by_sglang_and_loads_this_backend(tmp_path):
    import argparse
    import json
    import shlex
    import subprocess
    import sys

    from sglang.srt.server_args import ServerArgs
    from sglangutil import storage_config

    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "launch-flags", "sglang", "--model", "m", "--set",
                        "chunk_size=32", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)["commands"][-1]["command"]
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_cli_args(parser.parse_args(argv[3:]))
    assert args.page_size == 32 and args.enable_hierarchical_cache and args.hicache_storage_backend == "dynamic"
    extra = json.loads(args.hicache_storage_backend_extra_config)
    pool = HostPool("layer_first", 32, pages=4, layers=2, heads=2, head_dim=16)
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), pool)
    backend.register_mem_pool_host(pool)
    assert type(backend).__name__ == "LMCacheHiCacheStorage" and backend.config.chunk_size == 32


def _sglang_storage_metrics_type():
    """SGLang's own ``StorageMetrics`` dataclass, built from its source: the module that defines it imports
    SGLang's model configs, which need torchvision, which does not import beside the CPU torch here."""
    import ast
    import dataclasses
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sglang")
    source = Path(spec.origin).parent / "srt" / "observability" / "metrics_collector.py"
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StorageMetrics")
    fields = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]
    collector = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StorageMetricsCollector")
    logged = ast.unparse(next(f for f in collector.body if isinstance(f, ast.FunctionDef) and f.name == "log_storage_metrics"))
    assert all(f"storage_metrics.{name}" in logged for name in fields)  # what the collector reads
    return dataclasses.make_dataclass("StorageMetrics", [(f, list, dataclasses.field(default_factory=list)) for f in fields])


def test_get_stats_fills_sglangs_own_metrics_type():
    metrics_type = _sglang_storage_metrics_type()
    pool = HostPool("layer_first", PS, pages=16, layers=2, heads=2, head_dim=16)
    backend = make_backend(extra(), pool)
    toks = tokens(96)  # 3 pages
    keys = page_keys(toks, PS)
    fill(pool, toks, host_start=0)
    assert backend.batch_set_v1(keys, torch.arange(0, 3 * PS)) == [True] * 3
    assert backend.batch_get_v1(keys, torch.arange(5 * PS, 8 * PS)) == [True] * 3
    stats = backend.storage_metrics(metrics_type)
    assert stats.backup_pgs == [3] and stats.prefetch_pgs == [3]
    assert all(b > 0 for b in stats.backup_bandwidth + stats.prefetch_bandwidth)
    again = backend.storage_metrics(metrics_type)  # drained: each batch is reported once
    assert again.prefetch_pgs == [] and again.backup_pgs == []
    backend.close()
    assert backend.engine is None  # let go of its pool


def test_close_lets_the_server_forget_the_client_and_a_killed_process_is_forgotten_too(tmp_path):
    import subprocess
    import sys
    import textwrap
    import time

    from serverutil import ServerProcess

    server = ServerProcess("--chunk-size", str(PS)).start()
    try:
        pool = HostPool("layer_first", PS, pages=8, layers=2, heads=2, head_dim=16)
        backend = make_backend(extra(mode="mp", server_url=server.url), pool)
        toks = tokens(64)
        fill(pool, toks, host_start=0)
        assert backend.batch_set_v1(page_keys(toks, PS), torch.arange(0, 2 * PS)) == [True] * 2
        assert server.http("GET", "/stats")["sessions"] == 1
        backend.close()  # SGLang's shutdown path
        deadline = time.monotonic() + 10
        while server.http("GET", "/stats")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.http("GET", "/stats")["sessions"] == 0

        script = tmp_path / "sglang_like.py"  # a process that is SIGTERMed without closing anything
        script.write_text(textwrap.dedent(f"""
            import sys, time, torch
            sys.path.insert(0, {repr(str(__import__("pathlib").Path(__file__).parent))})
            from sglangutil import HostPool, make_backend, page_keys
            pool = HostPool("layer_first", {PS}, pages=8, layers=2, heads=2, head_dim=16)
            backend = make_backend({{"lmcache.chunk_size": {PS}, "lmcache.mode": "mp", "lmcache.server_url": {server.url!r}}}, pool)
            toks = [(i * 7) % 900 + 3 for i in range({PS})]
            backend.batch_set_v1(page_keys(toks, {PS}), torch.arange(0, {PS}))
            print("connected", flush=True)
            time.sleep(600)
        """))
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "connected"
        assert server.http("GET", "/stats")["sessions"] == 1
        p.terminate()
        p.wait()
        deadline = time.monotonic() + 10
        while server.http("GET", "/stats")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.http("GET", "/stats")["sessions"] == 0
    finally:
        server.stop()


def test_get_stats_through_sglangs_own_metrics_collector():
    """SGLang's real StorageMetricsCollector (as its scheduler runs it with --enable-metrics) takes what
    get_stats() returns; run where SGLang's metrics module imports (the Dynamo venv: torchvision guarded)."""
    import json
    import subprocess
    from pathlib import Path

    from venvs import dynamo_python  # skips locally, fails under CI, without that venv

    here = Path(__file__).resolve().parent
    r = subprocess.run([dynamo_python(), str(here / "sglang_metrics_check.py")], capture_output=True, text=True,
                       timeout=300, cwd=here.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["prefetch_pgs_count"] == 1 and got["prefetch_pgs_sum"] == 3  # one batch of 3 pages each way
    assert got["backup_pgs_count"] == 1 and got["backup_pgs_sum"] == 3
    assert got["prefetch_bandwidth_sum"] > 0 and got["backup_bandwidth_sum"] > 0
