"""Failure policy shared by the remote tiers: after a failure the tier stays quiet, then tries again.

A store that is down, unreachable or slow must not hold the engine: the first failure starts a quiet period
(``retry_interval_s``) in which lookups miss and stores drop without touching the network; the next call after
it tries again, so the tier reconnects by itself when the store is back. Each failure in a row doubles the quiet
period, up to ``MAX_QUIET_S``: a store that hangs (connections accepted, nothing answered) costs the engine one
timeout per quiet period, so a fixed period would leave it waiting most of the time. One log line when it
goes away and one when it comes back, never one per request.
"""

from __future__ import annotations

import logging
import threading
import time

from lmcache.core.tiers.stats import TierStats

log = logging.getLogger("lmcache")
#: the longest quiet period after failures in a row, in seconds
MAX_QUIET_S = 30.0


class RemoteHealth:
    def __init__(self, label: str, stats: TierStats, retry_interval_s: float = 1.0) -> None:
        #: how the tier is named in log lines (secrets masked)
        self.label = label
        self.stats = stats
        self.retry_interval_s = retry_interval_s
        self._down_until = 0.0
        self._down_logged = False
        self._in_a_row = 0
        self._lock = threading.Lock()

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, what: str, e: Exception, hint: str = "") -> None:
        self.stats.errors += 1
        with self._lock:
            now = time.monotonic()
            if now >= self._down_until:  # not a call that was already under way when the quiet period began
                quiet = min(MAX_QUIET_S, self.retry_interval_s * 2 ** min(self._in_a_row, 16))
                self._in_a_row += 1
                self._down_until = now + quiet
            if not self._down_logged:
                self._down_logged = True
                log.warning("lmcache remote tier %s: %s failed (%s: %s)%s; lookups miss and stores drop until it "
                            "answers again (retrying after %.1fs, then less often while it fails)", self.label, what,
                            type(e).__name__, e, f"; {hint}" if hint else "", self.retry_interval_s)

    def ok(self) -> None:
        self._in_a_row = 0
        if self._down_logged:
            with self._lock:
                if self._down_logged:
                    self._down_logged = False
                    log.warning("lmcache remote tier %s: reachable again", self.label)
