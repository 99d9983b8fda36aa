"""Engine-dependent test modules: where the engine is absent they skip with the reason, except under CI
(CI=true), which installs every engine (.ci/run) and so must never silently run fewer tests."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest


def require_engine(package: str, how: str):
    """Import and return the engine package. An engine that is installed but fails to import is a
    failure, never a skip (that is how a missing dependency of the engine shows up)."""
    if importlib.util.find_spec(package) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{package} is not installed but CI must run its tests: {how}")
        pytest.skip(f"{package} is not installed: {how}", allow_module_level=True)
    return importlib.import_module(package)
