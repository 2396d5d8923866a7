"""``flead supervise`` with real processes: a service killed with SIGKILL is started again and
its restart counted (state file, ``flead status``, the tables Grafana alerts on); a service
stopped on purpose stays stopped; a service that keeps dying is restarted ever more slowly.
Plus the pure rules: backoff, "lag keeps growing", log rotation."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time
from datetime import datetime

import pytest

from flead import services, status, supervision
from flead.config import Settings
from tests.streaming_harness import query, wait_for

# --- the rules -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_ceiling() -> None:
    assert [supervision.backoff(n, 1.0, 10.0) for n in range(6)] == [1, 2, 4, 8, 10, 10]


def test_lag_growing_needs_a_climb_over_the_whole_window() -> None:
    window = 100.0
    climbing = [(t, 1000 + 10 * t) for t in range(0, 101, 10)]
    assert supervision.lag_growing(climbing, window, now=100)
    # The saw-tooth of periodic offset commits: high between commits, low after each.
    sawtooth = [(t, 500 if (t // 10) % 2 else 50) for t in range(0, 101, 10)]
    assert not supervision.lag_growing(sawtooth, window, now=100)
    # A climb over a part of the window only (a replay burst) is not "keeps growing".
    short = [(t, 10 * t) for t in range(70, 101, 5)]
    assert not supervision.lag_growing(short, window, now=100)
    # Growing, then draining: the second half is not above the first.
    draining = [(t, 1000 - abs(50 - t) * 10) for t in range(0, 101, 10)]
    assert not supervision.lag_growing(draining, window, now=100)


def test_rotate_log_keeps_the_writer_appending(tmp_path) -> None:
    path = tmp_path / "svc.log"
    with path.open("ab") as writer:  # how services.spawn opens a service's log
        writer.write(b"old line\n" * 20)
        writer.flush()
        assert not supervision.rotate_log(path, max_bytes=1000, backups=2)
        assert supervision.rotate_log(path, max_bytes=100, backups=2)
        writer.write(b"new line\n")
        writer.flush()
        assert path.read_bytes() == b"new line\n"  # at the start: no hole of old bytes
        assert path.with_name("svc.log.1").read_bytes() == b"old line\n" * 20
        writer.write(b"more\n" * 30)
        writer.flush()
        assert supervision.rotate_log(path, max_bytes=100, backups=2)
    assert path.with_name("svc.log.2").read_bytes() == b"old line\n" * 20
    assert path.with_name("svc.log.1").read_bytes().startswith(b"new line\n")
    assert not path.with_name("svc.log.3").exists()


# --- real processes --------------------------------------------------------------------------


def _supervised(settings: Settings, tmp_path, **overrides) -> Settings:
    fast = {"supervise_interval_s": 0.3, "supervise_backoff_s": 0.5, "lag_check_interval_s": 1.0}
    return dataclasses.replace(settings, state_dir=tmp_path / "state", **{**fast, **overrides})


def _record(settings: Settings, name: str) -> dict:
    return supervision.read_state(settings).get("services", {}).get(name, {})


def _stop_all(settings: Settings, names: tuple[str, ...]) -> None:
    supervision.stop_supervisor(settings)
    for name in names:
        services.stop_pid(settings, name, timeout=30)


@pytest.mark.integration
def test_killed_service_is_restarted_and_counted(settings: Settings, tmp_path) -> None:
    settings = _supervised(settings, tmp_path)
    names = ("fedavg", "anomaly-sink")
    for name in names:
        services.start_streaming(settings, name)
    try:
        assert supervision.ensure_supervisor(settings) == "started"
        wait_for(lambda: _record(settings, "fedavg").get("alive"), 60, "the supervisor's report")
        victim = services.recorded_pid(settings, "fedavg")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)

        def restarted() -> int | None:
            pid = services.recorded_pid(settings, "fedavg")
            return pid if pid not in (None, victim) else None

        new_pid = wait_for(restarted, 60, "fedavg to be restarted")

        # The cycle that restarts it reports the dead pid; the next one the new, alive one.
        def counted() -> bool:
            record = _record(settings, "fedavg")
            return (record.get("restarts"), record.get("alive"), record.get("pid")) == (
                1,
                True,
                new_pid,
            )

        wait_for(counted, 30, "the count and the new pid")
        assert _record(settings, "fedavg")["restarts"] == 1
        assert _record(settings, "anomaly-sink").get("restarts", 0) == 0  # untouched
        # Lag is measured for the streaming services (nothing to consume here: 0).
        wait_for(lambda: _record(settings, "fedavg").get("lag") == 0, 30, "a lag measurement")

        # What Grafana's alert rules read.
        wait_for(
            lambda: query(settings, "SELECT restarts FROM service_health WHERE service = 'fedavg'")
            == [(1,)],
            30,
            "service_health",
        )
        assert query(settings, "SELECT service, reason FROM service_restarts") == [
            ("fedavg", "died")
        ]
        report = status.collect(settings)["services"]
        assert report["fedavg"]["restarts"] == 1 and report["fedavg"]["healthy"]
        assert report["anomaly-sink"]["restarts"] == 0
        assert report["supervisor"]["healthy"]

        # A deliberate stop (flead down, stop_pid) is not undone.
        services.stop_pid(settings, "fedavg", timeout=30)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert not services.pid_file(settings, "fedavg").exists()
            time.sleep(0.2)
        assert _record(settings, "fedavg")["restarts"] == 1
    finally:
        _stop_all(settings, names)


@pytest.mark.integration
def test_a_service_that_keeps_dying_is_restarted_ever_more_slowly(
    settings: Settings, tmp_path
) -> None:
    # FedAvg cannot reach its database: it dies at every start.
    settings = _supervised(
        settings,
        tmp_path,
        database_url="postgresql://flead@127.0.0.1:9/nowhere",
        supervise_backoff_s=1.0,
        supervise_backoff_max_s=60.0,
    )
    services.start_streaming(settings, "fedavg")
    try:
        supervision.ensure_supervisor(settings)
        wait_for(
            lambda: len(_record(settings, "fedavg").get("recent_restarts", [])) >= 4,
            90,
            "four restarts",
        )
        times = [
            datetime.fromisoformat(t).timestamp()
            for t in _record(settings, "fedavg")["recent_restarts"]
        ]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Each gap is the backoff (1, 2, 4 s) plus the time fedavg takes to start and die.
        assert gaps[2] > gaps[0] + 2, gaps
        assert gaps[1] > gaps[0] + 0.5, gaps
    finally:
        _stop_all(settings, ("fedavg",))
