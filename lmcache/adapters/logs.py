"""lmcache's log lines inside an engine's process: through the engine's own logging setup.

Engines configure their own loggers (handlers, format, destination) and nothing else; a library logger
without a handler of its own is invisible there. So an adapter hands lmcache's logger the engine logger's
handlers, unless the user gave lmcache's logger handlers already; ``log_level`` rules lmcache's lines.
"""

from __future__ import annotations

import logging


def follow_engine_logging(level: str, engine_logger: str) -> None:
    ours = logging.getLogger("lmcache")
    ours.setLevel(level)
    if ours.handlers:
        return
    theirs = logging.getLogger(engine_logger)
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if theirs.handlers:
        ours.propagate = False  # not twice through the root logger
