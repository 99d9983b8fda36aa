"""The HTTP frontend of ``lmcache server``: Prometheus metrics and a small JSON management API.

    GET  /health    {"ok": true, "version": ..., "uptime_s": ..., "tier_problems": [...]}
    GET  /stats     pool, per-tier counters, leases, queues, server counters
    GET  /clients   sessions seen in the last minute (never a session id: those are capabilities)
    GET  /metrics   Prometheus exposition
    POST /lookup    {"tokens": [...], "model": NAME?, "salt": ""?} -> cached tokens per tier, per model
    POST /clear     drops the CPU tier

Authorization (``Authorization: Bearer SECRET``, SECRET = the server's token or its local secret from
``/dev/shm/lmcache-<port>.key``): ``/health`` is always open. ``/lookup`` (an oracle for which prompts are
cached), ``/clients`` and ``/clear`` always need it. ``/stats`` and ``/metrics`` (aggregate counters) are
open on a server without a token and need it on a server with one.

Limits: bodies up to ``MAX_BODY`` with an exact ``Content-Length``, JSON nesting up to ``MAX_DEPTH``, a
socket timeout per connection and at most ``MAX_CONNECTIONS`` at once; every bad request gets a 4xx.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmcache import __version__

MAX_BODY = 64 << 20
MAX_DEPTH = 32
MAX_CONNECTIONS = 32
SOCKET_TIMEOUT_S = 10.0
OPEN_WITHOUT_TOKEN = {"/health", "/stats", "/metrics"}  # on a server with no token; /health always


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _depth_ok(raw: bytes) -> bool:
    """JSON nesting within MAX_DEPTH, checked on the bytes before parsing (no recursion)."""
    depth, in_str, escaped = 0, False, False
    for ch in raw:
        if in_str:
            if escaped:
                escaped = False
            elif ch == 0x5C:
                escaped = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return True


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once: beyond that a 503, then close."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                body = b'{"error": "too many connections: retry"}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        """One line, never a traceback: a client that hangs up or stalls is not the server's problem."""
        import logging
        import sys

        err = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(err, (OSError, TimeoutError)) else logging.WARNING
        logging.getLogger("lmcache").log(level, "lmcache server: HTTP request from %s failed: %s: %s",
                                         client_address[0], type(err).__name__, str(err)[:200])

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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
        timeout = SOCKET_TIMEOUT_S  # a stalled client costs one connection slot for this long at most

        def log_message(self, fmt, *args):  # keep the server's stdout for its own lines
            pass

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            return given.startswith("Bearer ") and server.authentic(given[len("Bearer "):].strip())

        def _guard(self, path: str) -> bool:
            """True when the request may go on; otherwise the 401 is sent."""
            if path == "/health" or (not server.token and path in OPEN_WITHOUT_TOKEN) or self._authorized():
                return True
            self._send(401, {"error": f"{self.command} {path} needs 'Authorization: Bearer SECRET': the server's token, "
                                      f"or (as the server's user) the local secret in {server.key.path}"})
            return False

        def _send(self, code: int, body, ctype: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/lookup", "/clear"):
                self._send(405, {"error": f"{path} takes POST with a JSON body"})
                return
            if path not in ("/health", "/stats", "/clients", "/metrics"):
                self._send(404, {"error": f"no such endpoint {path[:100]}: GET /health, /stats, /clients, /metrics; "
                                          "POST /lookup, /clear"})
                return
            if not self._guard(path):
                return
            if path == "/health":
                self._send(200, {"ok": True, "version": __version__, "uptime_s": time.time() - started,
                                 "tier_problems": list(server.stack.tier_problems)})
            elif path == "/stats":
                self._send(200, server.stats())
            elif path == "/clients":
                self._send(200, server.client_rows())
            else:
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4")

        def _json_body(self):
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                raise _BadRequest(411, "a POST needs a Content-Length header")
            try:
                length = int(raw_length)
            except ValueError:
                raise _BadRequest(400, "Content-Length must be a number") from None
            if length < 0:
                raise _BadRequest(400, "Content-Length must not be negative")
            if length > MAX_BODY:
                raise _BadRequest(413, f"body larger than {MAX_BODY} bytes")
            try:
                raw = self.rfile.read(length)
            except (socket.timeout, OSError):
                raise _BadRequest(408, "body not received in time") from None
            if len(raw) != length:
                raise _BadRequest(400, "body shorter than its Content-Length")
            if not _depth_ok(raw):
                raise _BadRequest(400, f"JSON nested deeper than {MAX_DEPTH}")
            try:
                return json.loads(raw or b"{}")
            except (ValueError, RecursionError) as e:
                raise _BadRequest(400, f"body must be JSON: {str(e)[:100]}") from None

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in ("/lookup", "/clear"):
                self._send(404, {"error": f"no such endpoint {path[:100]}: POST /lookup, /clear"})
                return
            try:
                body = self._json_body()
            except _BadRequest as e:
                self.close_connection = True
                self._send(e.code, {"error": str(e)})
                return
            if not self._guard(path):
                return
            if path == "/lookup":
                self._lookup(body)
            else:
                with server.lock:
                    self._send(200, {"cleared": server.stack.clear()})

        def _lookup(self, body) -> None:
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens):
                self._send(400, {"error": "'tokens' must be a list of token ids (0 <= id < 2**32)"})
                return
            want = body.get("model")
            if want is not None and want not in server.models:
                known = ", ".join(sorted(server.models)) or "none yet (an engine must connect first)"
                self._send(404, {"error": f"model {str(want)[:100]!r} has not connected to this server; known: {known}"})
                return
            out = {}
            for name, (hasher, heads) in list(server.models.items()):
                if want is not None and name != want:
                    continue
                from lmcache.core.keys import ChunkHasher, ObjectKey

                h = ChunkHasher(hasher.identity, hasher.chunk_size, str(body.get("salt", "")))
                with server.lock:
                    total = hasher.identity.geometry.num_kv_heads
                    tiers = server.stack.lookup_tiers(ObjectKey(k, *heads, total) for k in h.iter_keys(tokens))
                per_tier: dict[str, int] = {}
                for t in tiers:
                    per_tier[t] = per_tier.get(t, 0) + h.chunk_size
                out[name] = {"cached_tokens": len(tiers) * h.chunk_size, "per_tier": per_tier}
            self._send(200, {"tokens": len(tokens), "models": out})

    httpd = _BoundedHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name="lmcache-http", daemon=True).start()
    return httpd
