"""Plugins found through real entry points (a dist-info on sys.path), not by patching the registry."""

import sys
import textwrap

import pytest
import torch

from lmcache.core.hookspecs import HardwareBackend
from lmcache.core.plugins import build_registry, select_backend

PLUGIN = textwrap.dedent('''
    import torch
    from lmcache.core.hookspecs import hookimpl, StorageTierSpec
    from lmcache.hardware.cpu import CpuBackend

    class AcmeBackend(CpuBackend):
        name = "acme"
        priority = 10
        calls = 0
        def gather(self, kv, jobs):
            AcmeBackend.calls += 1
            super().gather(kv, jobs)

    @hookimpl
    def lmcache_hardware_backends():
        return [AcmeBackend()]

    @hookimpl
    def lmcache_storage_tiers():
        return [StorageTierSpec("acme", lambda url, cfg: None, "test tier")]
''')

CONFLICT = textwrap.dedent('''
    from lmcache.core.hookspecs import hookimpl
    from lmcache.hardware.cpu import CpuBackend

    @hookimpl
    def lmcache_hardware_backends():
        return [CpuBackend()]  # name 'cpu' is taken by the built-in
''')


TYPO = textwrap.dedent('''
    from lmcache.core.hookspecs import hookimpl

    @hookimpl
    def lmcache_storage_tier():  # misspelt: the hook is lmcache_storage_tiers
        return []
''')


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    (tmp_path / "acme_plugin.py").write_text(PLUGIN)
    (tmp_path / "conflict_plugin.py").write_text(CONFLICT)
    (tmp_path / "typo_plugin.py").write_text(TYPO)
    dist = tmp_path / "acme_lmcache-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-lmcache\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lmcache]\nacme = acme_plugin\nbroken = acme_missing_module\nconflict = conflict_plugin\ntypo = typo_plugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for m in ("acme_plugin", "conflict_plugin", "typo_plugin"):
        sys.modules.pop(m, None)


def test_builtin_cpu_backend_registers_through_the_hooks():
    reg = build_registry()
    assert reg.plugins["lmcache.hardware.cpu"] == "builtin"
    assert isinstance(reg.hardware["cpu"], HardwareBackend)
    assert select_backend("auto", "cpu", reg).name == "cpu"


def test_outside_plugin_is_found_and_used_and_failures_are_named(plugin_site):
    reg = build_registry()
    assert "acme" in reg.hardware and "acme" in reg.tiers
    assert reg.plugins["acme"].startswith("entry point of acme-lmcache")
    errors = {f.plugin: f.error for f in reg.failures}
    assert "No module named 'acme_missing_module'" in errors["broken"]
    assert "hardware backend name 'cpu' is already registered by plugin 'lmcache.hardware.cpu'" in errors["conflict"]
    assert reg.hardware["cpu"].__class__.__module__ == "lmcache.hardware.cpu"  # the built-in kept its name
    assert "lmcache_storage_tier" in errors["typo"] and "lmcache_storage_tiers" in errors["typo"]  # loud, with the fix
    assert "typo" not in reg.plugins

    # the higher-priority plugin backend is what "auto" picks, and it really runs the copies
    from kvutil import vllm_layout

    from lmcache.core.config import load_config
    from lmcache.core.engine import CacheEngine
    from lmcache.core.geometry import KVGeometry, ModelIdentity

    g = KVGeometry(1, 1, 4, 4, torch.float32)
    e = CacheEngine(load_config(env={}, overrides={"chunk_size": 4, "max_cpu_size_gb": 0.001}),
                    ModelIdentity("m", g), device="cpu", registry=reg)
    assert e.backend.name == "acme"
    e.store([1, 2, 3, 4], vllm_layout("LBNHC", g, 4, 4), torch.arange(4))
    assert type(e.backend).calls == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend serves cuda tensors here: no fallback")
def test_falling_back_to_reference_ops_says_why(caplog):
    import logging

    from lmcache.core.plugins import get_registry

    with caplog.at_level(logging.WARNING, logger="lmcache"):
        backend = select_backend("auto", "cuda", get_registry())
    assert backend.name == "cpu"
    (message,) = [r.getMessage() for r in caplog.records if "reference ops" in r.getMessage()]
    ok, why = get_registry().hardware["cuda"].available()
    assert not ok and f"cuda: {why}" in message


def test_a_tier_plugin_that_returns_something_else_is_refused_with_the_fix(plugin_site):
    from lmcache.core.config import load_config
    from lmcache.core.engine import CacheEngine
    from lmcache.core.geometry import KVGeometry, ModelIdentity

    reg = build_registry()
    cfg = load_config(env={}, overrides={"chunk_size": 4, "max_cpu_size_gb": 0.001, "remote_url": "acme://bucket"})
    with pytest.raises(ValueError, match="returned a NoneType without .*must implement lmcache.core.hookspecs.StorageTier"):
        CacheEngine(cfg, ModelIdentity("m", KVGeometry(1, 1, 4, 4, torch.float32)), device="cpu", registry=reg)
