"""What the README and examples/ show a newcomer runs as shown."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache.core.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks_to_run():
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_of_the_readme_runs(index, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(python_blocks()[index])
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_the_engine_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "engine_round_trip.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "bit for bit" in r.stdout, r.stderr


@pytest.mark.parametrize("name", ["cpu-only.yaml", "cpu-disk.yaml", "cpu-disk-redis.yaml", "cpu-disk-redis-s3.yaml", "mp-server.yaml"])
def test_the_example_configs_load(name):
    cfg = load_config(ROOT / "examples" / name, env={})
    assert cfg.chunk_size == 256
