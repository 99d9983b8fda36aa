"""``lmcache doctor``: readable table or --json; exit 1 when any check fails."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lmcache.cli.main import add_config_flags

    d = sub.add_parser("doctor", help="check the machine, config, tiers, engines and plugins; say how to fix what is wrong")
    d.add_argument("--check-cmd", metavar="COMMAND", help='also check an engine launch line, e.g. "vllm serve M --kv-transfer-config ..."')
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--skip-engines", action="store_true",
                   help="skip the engine interface checks (they import each installed engine, which takes seconds)")
    add_config_flags(d)
    d.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from lmcache.cli.main import emit, table
    from lmcache.core.config import parse_set_flags
    from lmcache.doctor import run_all

    rows = run_all(args.config, parse_set_flags(args.set), args.check_cmd, engines=not args.skip_engines)
    failed = sum(r.status == "fail" for r in rows)
    warned = sum(r.status == "warn" for r in rows)
    data = {"ok": failed == 0, "failures": failed, "warnings": warned, "checks": [r.as_dict() for r in rows]}

    def render(d: dict) -> None:
        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "info": "[dim]info[/]"}
        table("lmcache doctor", ["check", "status", "found", "fix"],
              [[c["name"], marks[c["status"]], c["found"], c["fix"]] for c in d["checks"]])
        print(f"{d['failures']} failing, {d['warnings']} warnings")

    emit(args, data, render)
    return 1 if failed else 0
