"""``lmcache doctor``: find setup mistakes and version skew before they become bug reports."""

from lmcache.doctor.report import Check, run_all

__all__ = ["Check", "run_all"]
