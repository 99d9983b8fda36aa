"""``lmcache pd-proxy``: one OpenAI-compatible endpoint over prefill and decode instances (``lmcache.proxy.pd``)."""

from __future__ import annotations

import argparse
import logging
from urllib.parse import urlsplit


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an instance's base URL such as http://127.0.0.1:8100")
    return text.rstrip("/")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pd-proxy", help="disaggregated prefill: send each request to a prefill instance, then a decode one")
    p.add_argument("--prefill", action="append", type=_url, required=True, metavar="URL",
                   help="a prefill instance (kv_role kv_producer), e.g. http://127.0.0.1:8100; repeatable")
    p.add_argument("--decode", action="append", type=_url, required=True, metavar="URL",
                   help="a decode instance (kv_role kv_consumer), e.g. http://127.0.0.1:8200; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to reach an instance (default %(default)s)")
    p.add_argument("--prefill-timeout", type=float, default=600.0,
                   help="longest a prefill may take, in seconds, before the next instance is tried (default %(default)s)")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks (default %(default)s)")
    p.set_defaults(func=cmd_pd_proxy)


def cmd_pd_proxy(args: argparse.Namespace) -> int:
    from lmcache.proxy.pd import PDProxy, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overlap = set(args.prefill) & set(args.decode)
    if overlap:
        raise ValueError(f"{', '.join(sorted(overlap))} is given as both --prefill and --decode: an instance has one role")
    proxy = PDProxy(args.prefill, args.decode, args.connect_timeout, args.prefill_timeout, args.health_interval)
    try:
        serve(proxy, args.host, args.port)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e}; pick another --port") from None
    return 0
