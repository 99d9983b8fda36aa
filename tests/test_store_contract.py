"""The store contract (``lmcache.core.store``): both stores implement it, the core depends on no edge,
and adapters use the contract only."""

import ast
from pathlib import Path

import pytest
from serverutil import ServerProcess
from tierutil import engine, prompt, retrieved_exactly, store

from lmcache.core.store import ChunkStore

ROOT = Path(__file__).resolve().parent.parent / "lmcache"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_core_imports_no_server_and_no_adapter():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(("lmcache.server", "lmcache.adapters")))
                 for p in (ROOT / "core").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_adapters_reach_the_store_through_the_contract_only():
    for path in (ROOT / "adapters").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args:
                target = ast.unparse(node.args[0])
                assert "stack" not in target and "engine" not in target, f"{path.name}: getattr({target}, ...)"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)  # private attributes of the engine or its store: never
                assert "engine" not in owner and "stack" not in owner, f"{path.name}: private {owner}.{node.attr}"


@pytest.mark.parametrize("mode", ["inproc", "mp"])
def test_both_stores_implement_the_contract_and_round_trip(mode):
    server = ServerProcess().start() if mode == "mp" else None
    try:
        e = engine(mode=mode, **({"server_url": server.url} if server else {}))
        assert isinstance(e.stack, ChunkStore)
        assert e.stack.poll_evictions() == 0 and e.tier_problems == [] and isinstance(e.stack.queue_depths(), dict)
        toks = prompt(48, 9)
        kv, slots = store(e, toks, seed=9)
        assert retrieved_exactly(e, toks, kv, slots) == 48
        assert e.clear() == 3
        e.close()
    finally:
        if server:
            server.stop()
