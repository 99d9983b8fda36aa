"""The real console script, in subprocesses."""

import json
import os
import subprocess
import sys

import lmcache


def run(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lmcache.cli.main", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lmcache {lmcache.__version__}"


def test_config_show_reports_sources(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 512\n")
    r = run("config", "show", "--json", "--config", str(f), "--set", "cache_salt=x", env={"LMCACHE_MAX_CPU_SIZE_GB": "1.5"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["chunk_size"] == {"value": 512, "source": f"file {f}"}
    assert data["max_cpu_size_gb"] == {"value": 1.5, "source": "env LMCACHE_MAX_CPU_SIZE_GB"}
    assert data["cache_salt"] == {"value": "x", "source": "command line"}
    human = run("config", "show", "--config", str(f))
    assert "chunk_size" in human.stdout and f"file {f}" in human.stdout


def test_bad_config_is_one_line_with_exit_code_2():
    r = run("config", "show", "--set", "max_cpu_size_gb=-2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "max_cpu_size_gb" in r.stderr and "-2" in r.stderr and "a number > 0" in r.stderr


def test_config_keys_lists_docs():
    r = run("config", "keys", "--json")
    keys = {k["key"]: k for k in json.loads(r.stdout)}
    assert keys["chunk_size"]["default"] == 256 and keys["chunk_size"]["doc"]


def test_bench_transfer_json_is_bit_exact_and_has_ratios():
    r = run("bench", "transfer", "--model-shape", "tiny", "--tokens", "2048", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["bit_exact"] is True and d["tokens"] == 2048
    assert d["store_ratio"] > 0 and d["retrieve_ratio"] > 0 and d["raw_store_copy_gbps"] > 0


def test_bench_transfer_of_vllm_cpus_layout_defaults_to_its_block_size_and_is_bit_exact():
    r = run("bench", "transfer", "--model-shape", "tiny", "--tokens", "2048", "--repeats", "1", "--layout", "vllm-cpu",
            "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["block_size"] == 128 and d["bit_exact"] is True and d["fallback"] is None
    assert d["store_ratio"] > 0 and d["retrieve_ratio"] > 0


def test_bench_transfer_human_output_and_progress():
    r = run("bench", "transfer", "--model-shape", "tiny", "--tokens", "1024", "--layout", "sglang", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "store" in r.stdout and "ratio" in r.stdout and "bit-exact: True" in r.stdout
    assert "against a raw copy" in r.stderr and "verifying every retrieved byte" in r.stderr


def test_bench_lookup():
    r = run("bench", "lookup", "--tokens", "8192", "--repeats", "3", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["hit_tokens"] == 8192 and d["lookup_ms_median"] > 0
    # 32 chunks: the native loop hashed them, and the same-run floor and ratios are printed beside it
    assert d["native_keys"] is True and d["native_keys_error"] is None
    assert d["floor_ms_median"] > 0 and d["lookup_over_floor"] > 0 and d["python_over_native_hash"] > 0
    # the list's ids read in place (token_list), timed beside array('I')'s conversion of the same list
    assert d["list_read_in_place"] is True and d["list_read_error"] is None
    assert d["list_read_ms_median"] > 0 and d["fromlist_ms_median"] > 0


def test_bench_rejects_bad_flags_clearly():
    r = run("bench", "transfer", "--tokens", "10")
    assert r.returncode == 2 and "--tokens 10: need at least one full chunk of 256 tokens" in r.stderr
    r = run("bench", "lookup", "--tokens", "100")
    assert r.returncode == 2 and "--tokens 100: need at least one full chunk of 256 tokens" in r.stderr
    r = run("bench", "lookup", "--repeats", "0")
    assert r.returncode == 2 and "--repeats 0: must be at least 1" in r.stderr


def test_bench_tier_disk_with_startup(tmp_path):
    r = run("bench", "tier", "--tier", "disk", "--model-shape", "tiny", "--chunks", "4", "--path", str(tmp_path),
            "--startup-chunks", "200", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["write_gbps"] > 0 and d["raw_read_gbps"] > 0 and d["startup_objects"] == 200 and d["startup_seconds"] > 0


def test_bench_tier_redis(redis_server):
    r = run("bench", "tier", "--tier", "redis", "--model-shape", "tiny", "--chunks", "4", "--url", redis_server.url)
    assert r.returncode == 0, r.stderr
    assert "raw redis-py SET/GET" in r.stdout and "read" in r.stdout
    assert redis_server.client().dbsize() == 0  # the benchmark cleans up after itself


def test_bench_tier_redis_unreachable_is_one_line():
    from redisutil import free_port

    r = run("bench", "tier", "--tier", "redis", "--model-shape", "tiny", "--url", f"redis://127.0.0.1:{free_port()}/0")
    assert r.returncode == 2 and "no Redis answers there" in r.stderr and r.stderr.strip().count("\n") == 0


def test_bench_transfer_mp_mode_compares_with_inproc():
    r = run("bench", "transfer", "--model-shape", "tiny", "--tokens", "2048", "--repeats", "1", "--mode", "mp", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["bit_exact"] is True and d["mp"]["bit_exact"] is True
    assert d["mp"]["store_vs_inproc"] > 0 and d["mp"]["retrieve_vs_inproc"] > 0


def test_bench_kernels_reports_ratio_to_a_same_run_copy():
    r = run("bench", "kernels", "--model-shape", "tiny", "--tokens", "1024", "--repeats", "1", "--device", "cpu",
            "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["bit_exact"] and d["backend"] == "cpu" and d["fallback"] is None
    assert d["raw_copy_gbps"] > 0 and d["gather_ratio"] == d["gather_gbps"] / d["raw_copy_gbps"]


def test_bench_ttft_builds_a_random_llama_and_retrieves_its_kv_bit_exact():
    from engineutil import require_engine

    require_engine("transformers", "bench ttft builds a transformers Llama (.ci/run installs it with vLLM)")
    r = run("bench", "ttft", "--model-shape", "tiny", "--tokens", "128,256", "--repeats", "1", "--device", "cpu",
            "--set", "chunk_size=64", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [row["tokens"] for row in d["rows"]] == [128, 256]
    assert all(row["bit_exact"] and row["prefill_s"] > 0 and row["ttft_cut"] > 0 for row in d["rows"])
    r = run("bench", "ttft", "--model-shape", "tiny", "--tokens", "10", "--device", "cpu")
    assert r.returncode == 2 and "--tokens" in r.stderr


def test_server_takes_lmcache_peer_flags_and_refuses_the_rest_with_the_fix():
    import subprocess
    import sys

    from serverutil import ServerProcess

    s = ServerProcess("--l1-size-gb", "0.0625", "--http-host", "127.0.0.1", "--eviction-policy", "LRU",
                      "--hash-algorithm", "blake3").start()
    try:
        assert s.http("GET", "/stats")["pool"]["capacity"] == 64 << 20  # --l1-size-gb is --cpu-size-gb
    finally:
        s.stop()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lmcache.cli.main", "server", *args], capture_output=True, text=True,
                              timeout=60)

    r = run("--l2-adapter", '{"type":"fs"}')
    assert r.returncode == 2 and "--l2-adapter is LMCache's flag" in r.stderr and "--disk-path" in r.stderr
    r = run("--prometheus-port", "9090")
    assert r.returncode == 2 and "/metrics" in r.stderr
    r = run("--bogus", "1")
    assert r.returncode == 2 and "usage: lmcache server" in r.stderr and "unrecognized arguments: --bogus 1" in r.stderr


def test_first_hour_mistakes_are_one_line_errors_not_tracebacks():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    piped = subprocess.run(f"{sys.executable} -m lmcache.cli.main doctor --skip-engines | head -1", shell=True,
                           capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr and piped.stdout.strip()
    huge = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "bench", "transfer", "--tokens", "256",
                           "--model-shape", "llama-3-8b", "--set", "max_cpu_size_gb=100000"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert huge.returncode == 2 and "Traceback" not in huge.stderr
    assert huge.stderr.strip().splitlines()[-1].startswith("lmcache: error: cannot allocate") and "max_cpu_size_gb" in huge.stderr
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    big = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "server", "--http-port", "0", "--cpu-size-gb",
                          f"{ram_gb * 0.9:.0f}"], capture_output=True, text=True, timeout=60, env=env)
    assert big.returncode == 2 and "more than 80% of this machine's" in big.stderr


def test_the_server_says_when_its_remote_tier_does_not_answer():
    from serverutil import ServerProcess

    s = ServerProcess("--remote-url", "redis://127.0.0.1:1").start()
    try:
        health = s.http("GET", "/health", auth=False)
        assert any("redis://127.0.0.1:1 does not answer" in p for p in health["tier_problems"])
        assert s.http("GET", "/stats")["tier_problems"] == health["tier_problems"]
    finally:
        s.stop()
    assert "problems: remote tier redis://127.0.0.1:1 does not answer" in s.output


def test_small_things_a_new_user_notices(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}

    def lm(*args, extra_env=None):
        return subprocess.run([sys.executable, "-m", "lmcache.cli.main", *args], capture_output=True, text=True,
                              timeout=120, env={**env, **(extra_env or {})})

    alone = lm("config")
    assert "usage: lmcache config" in alone.stdout and "show" in alone.stdout
    start = lm("config", "show", "--yaml")
    (tmp_path / "start.yaml").write_text(start.stdout)
    assert "# Tokens per chunk" in start.stdout and lm("config", "show", "--config", str(tmp_path / "start.yaml")).returncode == 0
    shown = json.loads(lm("config", "show", "--json", extra_env={"LMCACHE_LOG_LEVEL": "debug"}).stdout)
    assert shown["log_level"]["value"] == "DEBUG"
    for command in (("bench", "lookup", "--help"), ("bench", "kernels", "--help")):
        assert "timed repetitions" in lm(*command).stdout
    assert "default 5" in lm("server", "--help").stdout and "default 30" in lm("server", "--help").stdout
    missing = tmp_path / "not" / "yet"
    doctor = json.loads(lm("doctor", "--skip-engines", "--json", "--set", f"local_disk_path={missing}").stdout)
    row = next(c for c in doctor["checks"] if c["name"] == "disk tier")
    assert row["status"] == "ok" and "not created yet" in row["found"] and not missing.exists()  # doctor only looks
    unavailable = [c for c in doctor["checks"] if c["name"].startswith("backend ") and c["found"].startswith("unavailable")]
    assert unavailable and all(c["status"] == "info" for c in unavailable)  # no GPU here: neutral, not "ok"


def test_bench_says_when_a_figure_is_below_timer_resolution():
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "bench", "transfer", "--model-shape", "tiny",
                        "--tokens", "512", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["too_short_to_time"] is True
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "bench", "transfer", "--model-shape", "tiny",
                        "--tokens", "512"], capture_output=True, text=True, timeout=120)
    assert "below what this timer measures reliably" in r.stdout and " GiB" not in r.stdout + r.stderr


def test_pd_proxy_refuses_bad_urls_and_one_instance_in_both_roles():
    r = run("pd-proxy", "--prefill", "localhost:8100", "--decode", "http://127.0.0.1:8200")
    assert r.returncode == 2 and "expected an instance's base URL such as http://127.0.0.1:8100" in r.stderr
    r = run("pd-proxy", "--prefill", "http://127.0.0.1:8100", "--decode", "http://127.0.0.1:8100")
    assert r.returncode == 2 and "both --prefill and --decode" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("pd-proxy", "--decode", "http://127.0.0.1:8200")
    assert r.returncode == 2 and "--prefill" in r.stderr


def test_pd_proxy_answers_503_naming_the_kind_when_no_instance_is_up():
    import socket
    import time
    import urllib.error
    import urllib.request

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free()
    proc = subprocess.Popen([sys.executable, "-m", "lmcache.cli.main", "pd-proxy", "--prefill", f"http://127.0.0.1:{free()}",
                             "--decode", f"http://127.0.0.1:{free()}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "pd-proxy did not start"
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                                     {"Content-Type": "application/json"})
        t0 = time.monotonic()
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("a request with no instance up succeeded")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            assert e.code == 503 and body["error"]["message"].startswith("prefill failed")
        assert time.monotonic() - t0 < 15
        def status(req) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert status(f"http://127.0.0.1:{port}/health")[0] == 503  # the failed instances are marked down
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", b"not json", {"Content-Type": "application/json"})
        code, raw = status(bad)
        assert code == 400 and "not JSON" in json.loads(raw)["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(20)


def test_launch_flags_roles_print_prefill_decode_and_proxy_lines_and_need_a_shared_pool():
    r = run("launch-flags", "vllm", "--role", "decode")
    assert r.returncode == 2 and "mode=mp" in r.stderr and "remote_url" in r.stderr
    r = run("launch-flags", "vllm", "--role", "pd", "--set", "mode=mp", "--model", "M", "--json")
    assert r.returncode == 0, r.stderr
    commands = [c["command"] for c in json.loads(r.stdout)["commands"]]
    roles = [json.loads(c.split("--kv-transfer-config ")[1].split(" --port")[0].strip("'"))["kv_role"]
             for c in commands if "--kv-transfer-config" in c]
    assert roles == ["kv_producer", "kv_consumer"]
    assert commands[0].startswith("lmcache server") and commands[-1].startswith("lmcache pd-proxy --prefill http://127.0.0.1:8100")
    r = run("launch-flags", "sglang", "--role", "prefill", "--set", "mode=mp")
    assert r.returncode == 2 and "vllm only" in r.stderr
