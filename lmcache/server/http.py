"""The HTTP frontend of ``lmcache server``: Prometheus metrics and a small JSON management API.

    GET  /health    {"ok": true, "version": ..., "uptime_s": ...}
    GET  /stats     pool, per-tier counters, leases, queues, server counters
    GET  /clients   sessions seen in the last minute
    GET  /metrics   Prometheus exposition
    POST /lookup    {"tokens": [...], "model": NAME?, "salt": ""?} -> cached tokens per tier, per model
    POST /clear     drops the CPU tier; needs "Authorization: Bearer TOKEN" when the server has a token
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmcache import __version__

MAX_BODY = 64 << 20


class _StackCollector:
    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        stats = self.server.stats()
        hits = CounterMetricFamily("lmcache_chunk_hits", "Chunks found, per tier", labels=["tier"])
        misses = CounterMetricFamily("lmcache_chunk_misses", "Chunks looked for and not found, per tier", labels=["tier"])
        moved = CounterMetricFamily("lmcache_bytes", "Payload bytes in/out, per tier", labels=["tier", "direction"])
        evictions = CounterMetricFamily("lmcache_evictions", "Chunks evicted, per tier", labels=["tier"])
        drops = CounterMetricFamily("lmcache_drops", "Chunks dropped (queue full, no room, tier down)", labels=["tier"])
        errors = CounterMetricFamily("lmcache_tier_errors", "Tier I/O errors", labels=["tier"])
        corrupt = CounterMetricFamily("lmcache_corrupt_chunks", "Stored objects that failed verification", labels=["tier"])
        for tier, c in stats["tiers"].items():
            hits.add_metric([tier], c["hits"])
            misses.add_metric([tier], c["misses"])
            moved.add_metric([tier, "in"], c["bytes_in"])
            moved.add_metric([tier, "out"], c["bytes_out"])
            evictions.add_metric([tier], c["evictions"])
            drops.add_metric([tier], c["drops"])
            errors.add_metric([tier], c["errors"])
            corrupt.add_metric([tier], c["corrupt"])
        cpu = stats["tiers"]["cpu"]
        looked = cpu["hits"] + cpu["misses"]
        ratio = GaugeMetricFamily("lmcache_hit_ratio", "CPU-tier chunk hit ratio of retrieves")
        ratio.add_metric([], cpu["hits"] / looked if looked else 0.0)
        tokens = CounterMetricFamily("lmcache_hit_tokens", "Tokens served from the CPU tier (hits x chunk size)")
        tokens.add_metric([], cpu["hits"] * self.server.config.chunk_size)
        used = GaugeMetricFamily("lmcache_pool_bytes", "Shared CPU pool bytes", labels=["state"])
        used.add_metric(["used"], stats["pool"]["used"])
        used.add_metric(["capacity"], stats["pool"]["capacity"])
        queue = GaugeMetricFamily("lmcache_writeback_queue_depth", "Chunks waiting for a lower tier", labels=["tier"])
        for tier, depth in stats["queues"].items():
            queue.add_metric([tier], depth)
        clients = GaugeMetricFamily("lmcache_connected_clients", "Engine sessions seen in the last minute")
        clients.add_metric([], stats["clients"])
        yield from (hits, misses, moved, evictions, drops, errors, corrupt, ratio, tokens, used, queue, clients)


def start_http(server, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    registry.register(_StackCollector(server))
    latency = Histogram("lmcache_request_seconds", "Server-side request latency", ["op"], registry=registry,
                        buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0))
    server._observers.append(lambda op, s: latency.labels(op).observe(s))
    started = time.time()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # keep the server's stdout for its own lines
            pass

        def _send(self, code: int, body, ctype: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"ok": True, "version": __version__, "uptime_s": time.time() - started})
            elif self.path == "/stats":
                self._send(200, server.stats())
            elif self.path == "/clients":
                self._send(200, [s.__dict__ for s in server.active_sessions()])
            elif self.path == "/metrics":
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
            else:
                self._send(404, {"error": f"no such endpoint {self.path}"})

        def _json_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ValueError("body too large")
            return json.loads(self.rfile.read(length) or b"{}")

        def do_POST(self) -> None:
            try:
                body = self._json_body()
            except ValueError as e:
                self._send(400, {"error": f"body must be JSON: {e}"})
                return
            if self.path == "/lookup":
                self._lookup(body)
            elif self.path == "/clear":
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._send(403, {"error": "POST /clear needs 'Authorization: Bearer <the server token>'"})
                    return
                with server.lock:
                    self._send(200, {"cleared": server.stack.clear()})
            else:
                self._send(404, {"error": f"no such endpoint {self.path}"})

        def _lookup(self, body) -> None:
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens):
                self._send(400, {"error": "'tokens' must be a list of token ids (0 <= id < 2**32)"})
                return
            want = body.get("model")
            out = {}
            for name, (hasher, heads) in list(server.models.items()):
                if want is not None and name != want:
                    continue
                from lmcache.core.keys import ChunkHasher, ObjectKey

                h = ChunkHasher(hasher.identity, hasher.chunk_size, str(body.get("salt", "")))
                with server.lock:
                    tiers = server.stack.lookup_tiers(ObjectKey(k, *heads) for k in h.iter_keys(tokens))
                per_tier: dict[str, int] = {}
                for t in tiers:
                    per_tier[t] = per_tier.get(t, 0) + h.chunk_size
                out[name] = {"cached_tokens": len(tiers) * h.chunk_size, "per_tier": per_tier}
            self._send(200, {"tokens": len(tokens), "models": out})

    httpd = ThreadingHTTPServer((server.host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name="lmcache-http", daemon=True).start()
    return httpd
