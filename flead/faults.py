"""Crash points for the chaos tests: a named place in a service where a test can make the
process die with SIGKILL at the worst moment, such as FedAvg between its database commit and
its offset commit, where random kills almost never land.

A point fires only when the service runs with ``fault_injection`` on (``FLEAD_FAULT_INJECTION``,
off by default) and the test has armed it by creating ``<state_dir>/run/faults/<point>``. The
file is removed before the kill, so the restarted service passes the point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from flead.config import Settings

log = logging.getLogger(__name__)

FEDAVG_AFTER_DB_COMMIT = "fedavg-after-db-commit"
POINTS = (FEDAVG_AFTER_DB_COMMIT,)


def armed_file(settings: Settings, point: str) -> Path:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    return settings.run_dir / "faults" / point


def arm(settings: Settings, point: str) -> Path:
    """Make the next pass through ``point`` (of a service with these settings) a SIGKILL."""
    path = armed_file(settings, point)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def crash_point(settings: Settings, point: str) -> None:
    """SIGKILL this process here if ``point`` is armed (and fault injection is on)."""
    if not settings.fault_injection:
        return
    path = armed_file(settings, point)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # only the first process to get here fires
        log.warning("fault point %s armed: killing this process (SIGKILL)", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
