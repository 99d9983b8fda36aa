"""The example vendor package, installed with pip, found through its entry point, used end to end."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lmcache-vendor-example"


@pytest.fixture(scope="module")
def installed():
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "lmcache-vendor-example"],
                   capture_output=True, timeout=300)


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}


def test_doctor_lists_the_vendor_plugin(installed):
    r = subprocess.run([sys.executable, "-m", "lmcache.cli.main", "doctor", "--json", "--skip-engines"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    found = rows["plugin vendor_example"]["found"]
    assert "entry point of lmcache-vendor-example" in found
    assert "hardware backend 'vendor_cpu'" in found and "storage tier 'vfile'" in found
    assert rows["backend vendor_cpu"]["status"] == "ok"
    assert rows["backend for cpu"]["found"] == "auto selects 'cpu'"  # the vendor backend only runs when chosen


ROUND_TRIP = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[3])
    from tierutil import engine, prompt, retrieved_exactly, store
    from lmcache_vendor_example.plugin import VendorBackend
    url = "vfile://" + sys.argv[1]
    e = engine(remote_url=url, device_backend="vendor_cpu")
    assert e.backend.name == "vendor_cpu" and e.stack.remote.name == "vfile"
    toks = prompt(64)
    kv, slots = store(e, toks)
    e.flush()
    fresh = engine(remote_url=url, device_backend="vendor_cpu")
    assert fresh.lookup_tiers(toks) == ["vfile"] * 4, fresh.lookup_tiers(toks)
    assert retrieved_exactly(fresh, toks, kv, slots) == 64
    assert VendorBackend.calls >= 2
    print("round trip ok", sys.argv[2])
''')


def test_config_selects_vendor_tier_and_backend_and_chunks_round_trip(installed, tmp_path):
    script = tmp_path / "rt.py"
    script.write_text(ROUND_TRIP)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), "x", str(Path(__file__).parent)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "round trip ok x"
    assert len(list((tmp_path / "store").glob("*.obj"))) == 4
