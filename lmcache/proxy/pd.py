"""``lmcache pd-proxy``: disaggregated prefill behind one OpenAI-compatible endpoint.

Each request goes first to a prefill instance (a copy with ``max_tokens`` 1, never streamed): it computes the
prompt's KV and stores it in the shared lmcache pool (``kv_role: kv_producer``; its answer comes only after
the chunks are committed there). Then the original request goes to a decode instance (``kv_consumer``), which
loads the prompt's KV from the pool instead of computing it, and its answer, streamed or not, is the client's.

Why lmcache carries the KV and not a point-to-point transfer: the pool outlives instances (a restarted decode
instance still finds the KV) and any decode instance can take any request, so the proxy needs no pairing.

Choice of instance: the healthy one with the fewest requests in flight (ties in turn). An instance that
refuses a connection or answers 5xx is marked down and the request is tried on the next one; a background
check (``GET /health``) brings it back. When no instance of a kind is left the client gets a 503 with the
reason, never a hang. The client's ``X-Request-Id`` (or a new one) goes to both instances.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
from aiohttp import web

log = logging.getLogger("lmcache.pd_proxy")
T = TypeVar("T")
#: statuses of an instance that say "try another one" (the request itself is not at fault)
_RETRYABLE = {502, 503, 504}


@dataclass
class Instance:
    url: str
    kind: str  # "prefill" or "decode"
    healthy: bool = True
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str = ""


class NoInstance(Exception):
    """Every instance of one kind is down or failed this request."""


@dataclass
class Pool:
    """Instances of one kind, chosen least-loaded (ties in turn)."""

    instances: list[Instance]
    _turn: itertools.count = field(default_factory=itertools.count)

    def order(self) -> list[Instance]:
        """Healthy instances, least busy first (rotating among equals); then the ones marked down, last resort."""
        n = next(self._turn)
        ring = self.instances[n % len(self.instances):] + self.instances[: n % len(self.instances)]
        healthy = sorted((i for i in ring if i.healthy), key=lambda i: i.in_flight)
        return healthy + [i for i in ring if not i.healthy]


class PDProxy:
    def __init__(self, prefill: list[str], decode: list[str], connect_timeout_s: float = 5.0,
                 prefill_timeout_s: float = 600.0, health_interval_s: float = 2.0) -> None:
        if not prefill or not decode:
            raise ValueError("pd-proxy needs at least one --prefill URL and one --decode URL")
        self.prefill = Pool([Instance(u.rstrip("/"), "prefill") for u in prefill])
        self.decode = Pool([Instance(u.rstrip("/"), "decode") for u in decode])
        self.connect_timeout_s = connect_timeout_s
        self.prefill_timeout_s = prefill_timeout_s
        self.health_interval_s = health_interval_s
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None

    # -- app ------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/status", self.status)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s))
        self._health_task = asyncio.create_task(self._check_health())

    async def _stop(self, app: web.Application) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the proxy's app is not started"
        return self._session

    # -- health ---------------------------------------------------------------------------------------

    async def _check_health(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in self.prefill.instances + self.decode.instances))
            await asyncio.sleep(self.health_interval_s)

    async def _probe(self, inst: Instance) -> None:
        try:
            async with self.session.get(f"{inst.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok != inst.healthy:
            log.warning("lmcache pd-proxy: %s instance %s is %s", inst.kind, inst.url, "back" if ok else "down")
        inst.healthy = ok

    def _down(self, inst: Instance, why: str) -> None:
        inst.failures += 1
        inst.last_error = why
        if inst.healthy:
            log.warning("lmcache pd-proxy: %s instance %s failed (%s); trying another", inst.kind, inst.url, why)
        inst.healthy = False

    async def health(self, request: web.Request) -> web.Response:
        up = {k: sum(i.healthy for i in p.instances) for k, p in (("prefill", self.prefill), ("decode", self.decode))}
        ok = up["prefill"] > 0 and up["decode"] > 0
        return web.json_response({"ok": ok, "healthy": up}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        rows = [{"url": i.url, "kind": i.kind, "healthy": i.healthy, "in_flight": i.in_flight, "served": i.served,
                 "failures": i.failures, "last_error": i.last_error}
                for i in self.prefill.instances + self.decode.instances]
        return web.json_response({"instances": rows})

    async def models(self, request: web.Request) -> web.StreamResponse:
        for inst in self.decode.order():
            try:
                async with self.session.get(f"{inst.url}/v1/models") as r:
                    return web.Response(body=await r.read(), status=r.status, content_type="application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._down(inst, f"{type(e).__name__}: {e}")
        return _error(503, "no decode instance answered /v1/models")

    # -- requests -------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        path = request.path
        try:
            await self._prefill(path, body, headers)
        except NoInstance as e:
            return _error(503, f"prefill failed: {e}")
        except _ClientFault as e:  # the instance said the request is bad: the client hears it as it was said
            return web.Response(body=e.body, status=e.status, content_type="application/json")
        try:
            return await self._decode(request, path, body, headers)
        except NoInstance as e:
            return _error(503, f"decode failed: {e}")

    async def _each(self, pool: Pool, attempt: Callable[[Instance], Awaitable[T]]) -> T:
        """``attempt`` on the pool's instances in turn until one does not fail as an instance (refused, reset,
        timed out, 5xx); those it failed on are marked down. NoInstance, naming each failure, when none is left;
        a client fault (4xx) goes straight back to the caller."""
        errors = []
        for inst in pool.order():
            inst.in_flight += 1
            try:
                result = await attempt(inst)
                inst.served += 1
                return result
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, _InstanceFault) as e:
                why = f"{type(e).__name__}: {e}"
                errors.append(f"{inst.url}: {why}")
                self._down(inst, why)
            finally:
                inst.in_flight -= 1
        raise NoInstance("; ".join(errors) or "no instance configured")

    async def _prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        one = dict(body, max_tokens=1, stream=False)
        one.pop("stream_options", None)
        if "max_completion_tokens" in one:
            one["max_completion_tokens"] = 1
        if "n" in one:
            one["n"] = 1  # the KV of the prompt is the same for every choice
        timeout = aiohttp.ClientTimeout(total=self.prefill_timeout_s, sock_connect=self.connect_timeout_s)

        async def attempt(inst: Instance) -> None:
            async with self.session.post(f"{inst.url}{path}", json=one, headers=headers, timeout=timeout) as r:
                data = await r.read()
                if r.status in _RETRYABLE or r.status >= 500:
                    raise _InstanceFault(f"HTTP {r.status}: {data[:200]!r}")
                if r.status != 200:
                    raise _ClientFault(r.status, data)

        await self._each(self.prefill, attempt)

    async def _decode(self, request: web.Request, path: str, body: dict[str, Any],
                      headers: dict[str, str]) -> web.StreamResponse:
        async def attempt(inst: Instance) -> web.StreamResponse:
            async with self.session.post(f"{inst.url}{path}", json=body, headers=headers) as r:
                if r.status in _RETRYABLE or r.status >= 500:
                    raise _InstanceFault(f"HTTP {r.status}: {(await r.read())[:200]!r}")
                if not body.get("stream"):
                    return web.Response(body=await r.read(), status=r.status,
                                        content_type=r.content_type or "application/json")
                out = web.StreamResponse(status=r.status, headers={
                    "Content-Type": r.headers.get("Content-Type", "text/event-stream"), "Cache-Control": "no-cache",
                    "X-Request-Id": headers["X-Request-Id"]})
                await out.prepare(request)
                try:  # from the first byte on, the client has this instance's answer: no retry elsewhere
                    async for piece in r.content.iter_any():
                        await out.write(piece)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    self._down(inst, f"stream broke: {type(e).__name__}: {e}")
                    await out.write(b'data: {"error": {"message": "the decode instance went away mid-stream", '
                                    b'"type": "service_unavailable"}}\n\n')
                await out.write_eof()
                return out

        return await self._each(self.decode, attempt)


class _InstanceFault(Exception):
    """An instance answered with a server-side failure: another instance may do better."""


class _ClientFault(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(status, "error")
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def serve(proxy: PDProxy, host: str, port: int) -> None:
    print(f"lmcache pd-proxy listening on http://{host}:{port}: prefill {', '.join(i.url for i in proxy.prefill.instances)}; "
          f"decode {', '.join(i.url for i in proxy.decode.instances)}", flush=True)
    web.run_app(proxy.app(), host=host, port=port, print=None, access_log=None)
