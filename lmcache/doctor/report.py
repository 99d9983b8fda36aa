"""Runs every check and collects one row each: status, what was found, and a one-line fix."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

OK, WARN, FAIL = "ok", "warn", "fail"
INFO = "info"  # neither good nor bad: something absent that this machine does not need


@dataclass
class Check:
    name: str
    status: str
    found: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_all(config_path: str | None, overrides: dict, command: str | None, engines: bool = True) -> list[Check]:
    from lmcache.doctor import cmdline, environment, interfaces

    rows: list[Check] = []
    steps: list[Callable[[], Iterable[Check]]] = [
        environment.python_and_torch,
        lambda: environment.chunk_keys(config_path, overrides),
        environment.accelerator,
        lambda: environment.config_and_tiers(config_path, overrides),
        environment.plugins,
    ]
    if engines:  # imports every installed engine to compare interfaces: seconds each (vLLM ~10 s here)
        steps.append(interfaces.engines)
    if command:
        steps.append(lambda: cmdline.check_command(command, config_path, overrides))
    for step in steps:
        t0 = time.perf_counter()
        try:
            rows.extend(step())
        except Exception as e:  # a broken check must not hide the others
            rows.append(Check(getattr(step, "__name__", "check"), FAIL, f"the check itself crashed: {type(e).__name__}: {e}",
                              "report this as an lmcache bug"))
        _ = time.perf_counter() - t0
    return rows
