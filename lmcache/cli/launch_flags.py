"""``lmcache launch-flags ENGINE``: the engine command line that enables lmcache for the current config."""

from __future__ import annotations

import argparse
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lmcache.cli.main import add_config_flags

    p = sub.add_parser("launch-flags", help="print the engine command line that enables lmcache (vllm, sglang, dynamo)")
    p.add_argument("engine", help="engine adapter name: vllm, sglang, dynamo, or a plugin's")
    p.add_argument("--model", default="MODEL", help="model to serve (default: the placeholder MODEL)")
    p.add_argument("--engine", dest="backend", choices=["vllm", "sglang"], default="vllm",
                   help="for dynamo: which engine its workers run")
    p.add_argument("--role", choices=["both", "prefill", "decode", "pd"], default="both",
                   help="disaggregated prefill: this instance's role (prefill: kv_producer, decode: kv_consumer; pd: "
                        "both lines and the proxy); the instances need one pool (mode: mp, or a remote_url); vllm only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_flags(p)
    p.set_defaults(func=cmd_launch_flags)


def cmd_launch_flags(args: argparse.Namespace) -> int:
    from lmcache.cli.main import config_from_args, emit
    from lmcache.core.plugins import get_registry

    config = config_from_args(args)
    adapters = get_registry().adapters
    spec = adapters.get(args.engine)
    if spec is None or spec.launch_flags is None:
        raise ValueError(f"no engine adapter named {args.engine!r} with launch flags: choose one of "
                         f"{', '.join(sorted(n for n, s in adapters.items() if s.launch_flags)) or '(none installed)'}")
    config_path = args.config or os.environ.get("LMCACHE_CONFIG_FILE") or None
    if args.role != "both" and args.engine != "vllm":
        raise ValueError(f"--role {args.role} is supported for vllm only (lmcache pd-proxy in front of vLLM instances); "
                         f"run {args.engine} with --role both")
    lines = spec.launch_flags(config, args.model, {"config_path": config_path, "engine": args.backend, "role": args.role})
    data = {"engine": args.engine, "mode": config.mode, "commands": [{"what": w, "command": c} for w, c in lines]}

    def render(d: dict) -> None:
        for item in d["commands"]:
            print(f"# {item['what']}")
            print(item["command"])

    emit(args, data, render)
    return 0
