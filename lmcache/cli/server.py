"""``lmcache server``: the MP-mode cache daemon."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def _port(allow_zero: bool):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
        if not (0 if allow_zero else 1) <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {'0 (off) or ' if allow_zero else ''}1..65535")
        return value
    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lmcache.cli.main import add_config_flags

    s = sub.add_parser("server", help="run the shared cache daemon (MP mode) that engines connect to")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    s.add_argument("--port", type=_port(False), default=5555, help="ZeroMQ control port (default 5555)")
    s.add_argument("--http-port", type=_port(True), default=8080, help="HTTP metrics + management port (default 8080; 0: off)")
    s.add_argument("--http-host", help="address the HTTP port listens on (default: --host)")
    s.add_argument("--hash-algorithm", help=argparse.SUPPRESS)  # LMCache's flag: accepted, keys are fixed here
    for flag, fix in PEER_FLAGS_WITHOUT_MEANING.items():
        s.add_argument(flag, help=argparse.SUPPRESS, dest=f"peer_{flag.strip('-').replace('-', '_')}", metavar=fix)
    s.add_argument("--cpu-size-gb", "--l1-size-gb", type=float,
                   help="CPU pool size in GiB (default 5, or max_cpu_size_gb from the config; at most half the RAM and 80%% "
                        "of /dev/shm when not given; --l1-size-gb is LMCache's name)")
    s.add_argument("--chunk-size", type=int, help="tokens per chunk (default 256, or chunk_size from the config); engines "
                   "must match")
    s.add_argument("--eviction-policy", choices=("LRU",), help="eviction policy (default LRU)")
    s.add_argument("--disk-path", help="enable the disk tier in this directory")
    s.add_argument("--remote-url", help="enable a remote tier, e.g. redis://127.0.0.1:6379/0")
    s.add_argument("--token", default="", help="shared secret clients must present (visible to every local user in the "
                   "process list: prefer --token-file or LMCACHE_SERVER_TOKEN)")
    s.add_argument("--token-file", metavar="FILE", help="read the shared secret from FILE (first line)")
    s.add_argument("--allow-remote", action="store_true", help="allow --host other than loopback (needs a token)")
    s.add_argument("--lease-timeout", type=_positive, default=30.0,
                   help="seconds after which a silent client is checked; a dead one's pins are released (default 30)")
    s.add_argument("--client-quota-gb", type=_positive,
                   help="most pool memory one client may hold at once, reserved or being read (default: 3/4 of the pool)")
    s.add_argument("--max-message-mb", type=_positive,
                   help="largest message accepted (default: one chunk of a 405B-class model, chunk_size x 512 KiB + 1 MiB)")
    add_config_flags(s)
    s.set_defaults(func=cmd_server)


def _sensible_pool_gb(default_gb: float) -> float:
    """Without an explicit size: the default, but at most half the RAM and 80% of free /dev/shm."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    st = os.statvfs("/dev/shm")
    shm_free = st.f_bavail * st.f_frsize
    return round(max(0.1, min(default_gb, 0.5 * ram / 2**30, 0.8 * shm_free / 2**30)), 2)


#: LMCache's server flags with no meaning here, and what to do instead
PEER_FLAGS_WITHOUT_MEANING = {
    "--l2-adapter": "use --disk-path DIR (local disk) or --remote-url URL (Redis/Valkey) for lower tiers",
    "--eviction-trigger-watermark": "lmcache evicts on demand, least recently used first; drop the flag",
    "--eviction-ratio": "lmcache evicts on demand, least recently used first; drop the flag",
    "--prometheus-port": "metrics are served on --http-port at /metrics; drop the flag",
}


def _peer_flags(args: argparse.Namespace) -> None:
    for flag, fix in PEER_FLAGS_WITHOUT_MEANING.items():
        if getattr(args, f"peer_{flag.strip('-').replace('-', '_')}") is not None:
            raise ValueError(f"{flag} is LMCache's flag and has no meaning here: {fix}")
    if args.hash_algorithm is not None and args.hash_algorithm.lower() != "blake3":
        raise ValueError(f"--hash-algorithm {args.hash_algorithm}: lmcache's chunk keys are fixed (SGLang's sha256 page "
                         "chain scoped with blake3, the same in every engine); drop the flag")


def _token(args: argparse.Namespace, config_token: str) -> str:
    """--token-file, else server_token (LMCACHE_SERVER_TOKEN, the config file), else --token (warned: other
    local users can read a command line)."""
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--token-file {args.token_file}: {e.strerror}; give a readable file") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty: write the secret on its first line")
        return token
    if config_token:
        return config_token
    if args.token:
        print("lmcache server: warning: --token is visible to every local user (ps, /proc/PID/cmdline); "
              "prefer --token-file FILE or LMCACHE_SERVER_TOKEN", file=sys.stderr, flush=True)
    return args.token


def cmd_server(args: argparse.Namespace) -> int:
    from lmcache.cli.main import config_from_args
    from lmcache.server.http import start_http

    _peer_flags(args)
    from lmcache.server.server import is_loopback

    if args.http_host and not is_loopback(args.http_host) and not args.allow_remote:
        raise ValueError(f"--http-host {args.http_host} is not loopback: also pass --allow-remote and a token "
                         "(--token-file), or keep the HTTP port on loopback")
    from lmcache.server.server import CacheServer

    cfg = config_from_args(args, max_cpu_size_gb=args.cpu_size_gb, chunk_size=args.chunk_size,
                           eviction_policy=args.eviction_policy, local_disk_path=args.disk_path,
                           remote_url=args.remote_url)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if cfg.source_of("max_cpu_size_gb") == "default":
        cfg = cfg.replace(max_cpu_size_gb=_sensible_pool_gb(cfg.max_cpu_size_gb))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cfg.max_cpu_size_gb * 2**30 > 0.8 * ram:  # the same bar as lmcache doctor's "cpu tier size"
        raise ValueError(f"--cpu-size-gb {cfg.max_cpu_size_gb:g} is more than 80% of this machine's {ram / 2**30:.1f} GiB "
                         f"of RAM (engines need the rest): use at most {0.8 * ram / 2**30:.0f}")
    token = _token(args, cfg.server_token)
    quota = None if args.client_quota_gb is None else int(args.client_quota_gb * 2**30)
    max_message = None if args.max_message_mb is None else int(args.max_message_mb * 2**20)
    from lmcache.server.local_auth import ServerAlreadyRunning

    try:
        server = CacheServer(cfg, args.host, args.port, token, args.allow_remote, args.lease_timeout, quota, max_message)
    except ServerAlreadyRunning as e:
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e}; pick another --port") from None
    httpd = None
    if args.http_port:
        try:
            httpd = start_http(server, args.http_host or args.host, args.http_port)
        except OSError as e:
            server.close()
            raise ValueError(f"cannot listen on HTTP {args.host}:{args.http_port}: {e}; pick another --http-port") from None
    from lmcache.core.hookspecs import Pingable

    for remote in server.stack.remotes:
        if isinstance(remote, Pingable) and not remote.ping():
            # started all the same (it reconnects by itself), but said everywhere a person looks
            server.stack.tier_problems.append(f"remote tier {remote.safe_url()} does not answer: stores to it "
                                              "drop and lookups miss until it does")
    tiers = ["cpu"] + [t.name for t in server.stack.lower]
    print(f"lmcache server {server.instance} listening on tcp://{args.host}:{args.port}"
          + (f", http://{args.http_host or args.host}:{args.http_port}" if httpd else ""), flush=True)
    print(f"  pool {cfg.max_cpu_size_gb:g} GiB in {server.shm.path}; chunk_size {cfg.chunk_size}; tiers {' -> '.join(tiers)}"
          + (f"; problems: {'; '.join(server.stack.tier_problems)}" if server.stack.tier_problems else ""), flush=True)

    def stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    finally:
        print("lmcache server: shutting down (flushing write-back queues)", flush=True)
        if httpd is not None:
            httpd.shutdown()
        server.close()
    return 0

