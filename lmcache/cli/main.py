"""The ``lmcache`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmcache import __version__
from lmcache.core.config import ConfigError, describe_keys, load_config, parse_set_flags


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: $LMCACHE_CONFIG_FILE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")


def config_from_args(args: argparse.Namespace, **flag_overrides: Any) -> Any:
    overrides = parse_set_flags(args.set)
    overrides.update({k: v for k, v in flag_overrides.items() if v is not None})
    return load_config(args.config, overrides=overrides)


def emit(args: argparse.Namespace, data: Any, render) -> None:
    """--json prints machine-readable data; otherwise a table for people."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    console = Console()
    # piped output (logs, CI) gets a wide table instead of folded cells
    out = Console(width=console.width if console.is_terminal else 200)
    out.print(title, style="bold", soft_wrap=True, highlight=False)
    out.print(t)


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.yaml:  # a file to start from: every key, its effective value, its doc line
        for key, _, _, doc in describe_keys():
            print(f"# {doc}")
            print(yaml_line(key, cfg.as_dict()[key]))
        return 0
    data = {k: {"value": v, "source": cfg.source_of(k)} for k, v in cfg.as_dict().items()}
    emit(args, data, lambda d: table("effective lmcache config", ["key", "value", "from"],
                                     [[k, repr(x["value"]), x["source"]] for k, x in d.items()]))
    return 0


def markdown_keys() -> str:
    """The README's config table, made from the config model (a test keeps the README equal to it)."""
    def default(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return '""' if value == "" else str(value)

    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k}` | {default(d)} | {doc.replace('|', '/')} |" for k, _, d, doc in describe_keys()]
    return "\n".join(rows)


def yaml_line(key: str, value: Any) -> str:
    import yaml

    return yaml.safe_dump({key: value}, default_flow_style=False).strip()


def cmd_config_keys(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_keys())
        return 0
    data = [{"key": k, "type": t, "default": d, "doc": doc} for k, t, d, doc in describe_keys()]
    emit(args, data, lambda d: table("lmcache config keys (env: LMCACHE_<KEY>)", ["key", "type", "default", "doc"],
                                     [[x["key"], x["type"], repr(x["default"]), x["doc"]] for x in d]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmcache.cli import bench

    parser = argparse.ArgumentParser(prog="lmcache", description="Engine-agnostic KV-cache layer for LLM serving.")
    parser.add_argument("--version", action="version", version=f"lmcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cfg = sub.add_parser("config", help="show the effective config or the list of keys")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = cfg_sub.add_parser("show", help="effective config, with where each value came from")
    add_config_flags(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--yaml", action="store_true", help="print a config file to start from (every key, with its doc)")
    show.set_defaults(func=cmd_config_show)
    keys = cfg_sub.add_parser("keys", help="every config key with its default and doc line")
    keys.add_argument("--json", action="store_true", help="machine-readable output")
    keys.add_argument("--markdown", action="store_true", help="the README's table")
    keys.set_defaults(func=cmd_config_keys)
    cfg.set_defaults(func=lambda args: (cfg.print_help(), 2)[1])  # "lmcache config" alone: its own help

    bench.add_parsers(sub)
    from lmcache.cli import doctor, launch_flags, pd_proxy, s3, server

    doctor.add_parser(sub)
    launch_flags.add_parser(sub)
    pd_proxy.add_parser(sub)
    s3.add_parser(sub)
    server.add_parser(sub)
    _mark_own_parsers(parser)
    return parser


def _mark_own_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command remembers its parser, so errors are said under its own usage line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(own_parser=child)
                _mark_own_parsers(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said under the subcommand's own usage line, not the top level's
        own = getattr(args, "own_parser", None) or parser
        own.error(f"unrecognized arguments: {' '.join(unknown)} (see '{own.prog} --help')")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (ConfigError, ValueError) as e:
        print(f"lmcache: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (lmcache doctor | head): not an error
        _silence_stdout()
        return 0
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "alloc" in str(e).lower():
            print(f"lmcache: error: cannot allocate the memory asked for ({str(e).splitlines()[0][:160]}): lower "
                  "max_cpu_size_gb (--set max_cpu_size_gb=N) or the command's sizes", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("lmcache: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """After a closed pipe, send what is still buffered nowhere, so the exit flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
