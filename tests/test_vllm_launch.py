"""``lmcache launch-flags vllm`` prints lines that vLLM's own argument parser and config accept, and that
load this package's connector through vLLM's connector factory."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from vllmutil import write_model_dir  # noqa: E402  (skips when vllm is absent)


def launch_flags(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "launch-flags", *args, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def engine_config(line: str):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = shlex.split(line)
    assert argv[:2] == ["vllm", "serve"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:] + ["--model", argv[2]])
    return EngineArgs.from_cli_args(args).create_engine_config()


@pytest.mark.parametrize("mode", ["inproc", "mp"])
def test_printed_vllm_lines_are_accepted_by_vllm(tmp_path, mode):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    model = write_model_dir(tmp_path / "m")
    out = launch_flags("vllm", "--model", model, "--set", "chunk_size=32", "--set", f"mode={mode}")
    lines = [c["command"] for c in out["commands"] if c["command"].startswith("vllm serve")]
    assert lines
    for line in lines:
        vc = engine_config(line)
        cls = KVConnectorFactory.get_connector_class(vc.kv_transfer_config)
        assert cls.__module__.startswith("lmcache."), cls
        assert vc.kv_transfer_config.kv_role == "kv_both"
    if mode == "mp":
        assert any(c["command"].startswith("lmcache server") for c in out["commands"])
        assert any("--kv-offloading-backend lmcache" in line for line in lines)
    else:
        vc = engine_config(lines[0])
        assert vc.kv_transfer_config.kv_connector_extra_config == {"lmcache.chunk_size": 32}
        assert vc.kv_transfer_config.kv_load_failure_policy == "recompute"


def test_config_file_travels_by_path(tmp_path):
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text("chunk_size: 64\nmax_cpu_size_gb: 2\n")
    out = launch_flags("vllm", "--config", str(cfg))
    extra = json.loads(shlex.split(out["commands"][0]["command"])[4])["kv_connector_extra_config"]
    assert extra == {"lmcache.config_file": str(cfg)}


def test_dynamo_vllm_worker_line_carries_flags_vllm_accepts(tmp_path):
    model = write_model_dir(tmp_path / "m")
    out = launch_flags("dynamo", "--engine", "vllm", "--model", model, "--set", "chunk_size=32")
    argv = shlex.split(out["commands"][-1]["command"])
    assert argv[:5] == ["python", "-m", "dynamo.vllm", "--model", model]
    # Dynamo's vLLM worker passes engine flags through to vLLM's own parser
    vc = engine_config(shlex.join(["vllm", "serve", model, *argv[5:]]))
    assert vc.kv_transfer_config.kv_connector_module_path == "lmcache.adapters.vllm"
