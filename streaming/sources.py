"""Data sources: everything the replay producer can stream, as ``Reading``s in event-time order.

Every source yields readings sorted by event time, ties broken deterministically (by device, then
by position in the source), because the stream's consumers keep per-device state and the Kafka
key is ``device_id``: replaying the same source twice must produce the same stream.

Bad input is a fact of life with real files, so no loader stops on a bad row: it is counted in a
:class:`LoadReport` (reason -> count), and the first row of each reason is logged as a warning.

Sources:

- :func:`synthetic_fleet` - an embedded, seeded IoT fleet with labelled anomalies of several kinds
  (columnar form: :func:`synthetic_fleet_arrays`).
- :func:`csv_readings` - generic ``timestamp,device_id,value[,label]`` CSV.
- :func:`skab_readings` - the Skoltech Anomaly Benchmark in its native ``;`` format.
- :func:`wsn_readings` - the single-hop wireless sensor network (TelosB motes) CSV.
- :func:`edge_iiot_readings` - the Edge-IIoTset ``DNN-EdgeIIoT-dataset.csv`` format.
- :func:`open_source` - dispatcher by name.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from streaming.messages import Reading

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_MIN_US = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // _US
_MAX_US = (datetime(9999, 12, 30, tzinfo=UTC) - _EPOCH) // _US

#: Where the shared test data lives when running from the repository: ``<repo>/../shared/data``.
#: Anchored on this file rather than the working directory so it works from any directory.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------------------------
# Bad-row accounting
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a loader read. Bad rows are counted, never fatal, so a messy file still replays.

    ``rows`` counts readings yielded so far; ``bad_rows`` counts readings that were dropped. For
    files with several sensors per line (SKAB) both count readings, not lines.
    """

    rows: int = 0
    bad_rows: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def add_bad(self, reason: str, count: int = 1) -> None:
        self.bad_rows += count
        self.reasons[reason] += count

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for logs, run metadata and dashboards."""
        return {"rows": self.rows, "bad_rows": self.bad_rows, "reasons": dict(self.reasons)}


class _BadRow(ValueError):
    """Raised by row parsers; the message is the reason that goes into the report."""


class _Tally:
    """Counts bad rows into a report and warns once per reason, so the log shows every kind of
    problem without one line per bad row of a two-million-row file."""

    def __init__(self, report: LoadReport | None, source: str) -> None:
        self.report = report if report is not None else LoadReport()
        self.source = source
        self._warned: set[str] = set()

    def bad(self, reason: str, where: str, count: int = 1) -> None:
        self.report.add_bad(reason, count)
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(
                "%s: bad row (%s) at %s; rows with this reason are skipped and counted",
                self.source,
                reason,
                where,
            )


# --------------------------------------------------------------------------------------------
# Field parsers shared by the file loaders
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _to_us(ts: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are UTC by the project's convention."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _US


def _checked_us(us: int) -> int:
    if not _MIN_US <= us <= _MAX_US:
        raise _BadRow("unparsable timestamp")
    return us


def _parse_iso_us(raw: str) -> int:
    """ISO 8601 (``T`` or space, optional fraction of any length, ``Z`` or offset; naive = UTC)."""
    try:
        return _to_us(datetime.fromisoformat(raw))
    except ValueError as exc:
        raise _BadRow("unparsable timestamp") from exc


def _parse_csv_time_us(raw: str) -> int:
    """Generic CSV time: a plain number is epoch seconds, anything else must be ISO 8601."""
    raw = raw.strip()
    if _NUMBER.match(raw):
        seconds = float(raw)
        if not math.isfinite(seconds) or abs(seconds) > 1e12:
            raise _BadRow("unparsable timestamp")
        return _checked_us(round(seconds * 1_000_000))
    return _parse_iso_us(raw)


def _parse_value(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise _BadRow("unparsable value") from exc
    if not math.isfinite(value):  # the stream contract only carries finite numbers
        raise _BadRow("non-finite value")
    return value


def _parse_label(raw: str | None, *, optional: bool) -> int | None:
    """0/1 in any spelling the datasets use (``1``, ``1.0``); empty means unlabelled if allowed."""
    text = (raw or "").strip()
    if not text and optional:
        return None
    try:
        label = float(text)
    except ValueError as exc:
        raise _BadRow("unparsable label") from exc
    if label not in (0.0, 1.0):
        raise _BadRow("unparsable label")
    return int(label)


def _column_index(header: Sequence[str], wanted: Sequence[str], source: str) -> dict[str, int]:
    """Header lookup by name, so any column order works; a missing column is a file error."""
    names = [h.strip() for h in header]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; header is {names}")
    return {w: names.index(w) for w in wanted}


# --------------------------------------------------------------------------------------------
# Columnar buffer: read everything compactly, sort once, yield Readings lazily
# --------------------------------------------------------------------------------------------


class _Columns:
    """Parsed rows in typed arrays (~21 bytes per reading) rather than millions of objects, so a
    whole file can be held and sorted into event-time order before the first reading is yielded."""

    def __init__(self) -> None:
        self.ts_us = array("q")
        self.device = array("i")
        self.value = array("d")
        self.label = array("b")  # -1 = unlabelled
        self.device_ids: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, ts_us: int, device_id: str, value: float, label: int | None) -> None:
        idx = self._index.get(device_id)
        if idx is None:
            idx = self._index[device_id] = len(self.device_ids)
            self.device_ids.append(device_id)
        self.ts_us.append(ts_us)
        self.device.append(idx)
        self.value.append(value)
        self.label.append(-1 if label is None else label)

    def sorted_readings(self, tally: _Tally, block: int = 65_536) -> Iterator[Reading]:
        """Event-time order; ties by device id, then by position in the source."""
        n = len(self.ts_us)
        ts = np.frombuffer(self.ts_us, dtype=np.int64) if n else np.zeros(0, np.int64)
        dev = np.frombuffer(self.device, dtype=np.int32) if n else np.zeros(0, np.int32)
        rank = np.empty(len(self.device_ids), dtype=np.int64)  # device id -> its sort position
        rank[np.argsort(np.array(self.device_ids, dtype=str))] = np.arange(len(rank))
        order = np.lexsort((np.arange(n), rank[dev], ts))
        values = np.frombuffer(self.value, dtype=np.float64) if n else np.zeros(0)
        labels = np.frombuffer(self.label, dtype=np.int8) if n else np.zeros(0, np.int8)
        for lo in range(0, n, block):
            idx = order[lo : lo + block]
            for t, d, v, lab in zip(
                ts[idx].tolist(),
                dev[idx].tolist(),
                values[idx].tolist(),
                labels[idx].tolist(),
                strict=True,
            ):
                tally.report.rows += 1
                yield Reading(self.device_ids[d], _EPOCH + t * _US, v, None if lab < 0 else lab)
        logger.info("%s: %s", tally.source, tally.report.as_dict())


def _read_rows(
    path: Path,
    tally: _Tally,
    parse: Callable[[list[str], int], tuple[int, str, float, int | None]],
    n_fields: int,
    delimiter: str = ",",
) -> _Columns:
    """Run ``parse(row, line_no)`` over every data row; bad rows go to the tally."""
    columns = _Columns()
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)  # header, already read by the caller
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line: not a row at all
            where = f"line {reader.line_num}"
            if len(row) != n_fields:
                tally.bad("wrong field count", where)
                continue
            try:
                columns.add(*parse(row, reader.line_num))
            except _BadRow as exc:
                tally.bad(str(exc), where)
    return columns


def _read_header(path: Path, delimiter: str = ",") -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), None)
    if not header:
        raise ValueError(f"{path}: empty file, no header")
    return [h.strip() for h in header]


# --------------------------------------------------------------------------------------------
# 1. Synthetic fleet
# --------------------------------------------------------------------------------------------

#: Anomaly kind codes in :attr:`FleetArrays.anomaly_kind` (index = code, 0 = normal).
ANOMALY_KINDS: tuple[str, ...] = ("none", "spike", "level_shift", "stuck", "noise_burst", "drift")
_SPIKE, _LEVEL, _STUCK, _BURST, _DRIFT = 1, 2, 3, 4, 5
# Per kind (by code): stretch length range [lo, hi] in readings, magnitude range in noise sigmas.
_LEN_LO = np.array([0, 1, 5, 8, 5, 10])
_LEN_HI = np.array([0, 1, 15, 20, 15, 25])
_MAG_LO = np.array([0.0, 4.0, 3.0, 0.0, 3.0, 3.0])
_MAG_HI = np.array([0.0, 8.0, 6.0, 0.0, 6.0, 6.0])
#: Devices per random stream. Each chunk draws for all its devices even when the fleet ends
#: inside it, so device i's data depends on (seed, i), not on how many devices the fleet has.
_CHUNK = 1024
_DAY_MS = 86_400_000


@dataclass
class FleetArrays:
    """The synthetic fleet, columnar and already in event-time order (row i = i-th reading)."""

    device: np.ndarray  # int32 index into device_ids
    timestamp_ms: np.ndarray  # int64 epoch milliseconds, UTC
    value: np.ndarray  # float64
    label: np.ndarray  # int8, 1 = anomaly
    anomaly_kind: np.ndarray  # int8 code, see ANOMALY_KINDS
    device_ids: list[str]

    def __len__(self) -> int:
        return len(self.value)


def _device_ids(num_devices: int) -> list[str]:
    width = max(4, len(str(num_devices - 1)))
    return [f"device_{i:0{width}d}" for i in range(num_devices)]


def _chunk_signal(
    rng: np.random.Generator, n_readings: int, start_ms: int, interval_ms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean signal + noise for one chunk: baseline, daily cycle, drift, noise per device.

    Returns ``(values[CHUNK, T], sigma[CHUNK], offset_ms[CHUNK])``. Levels are lognormal so the
    fleet mixes sensors of very different scales (0.1 .. 1000s), which is what makes raw-scale
    features useless across devices and forces scale-free ones.
    """
    n = _CHUNK
    baseline = np.exp(rng.normal(np.log(20.0), 1.5, n))
    sigma = baseline * np.exp(rng.normal(np.log(0.02), 0.5, n))
    amplitude = sigma * np.exp(rng.normal(np.log(3.0), 0.6, n))
    phase = rng.uniform(0.0, 2 * np.pi, n)
    drift_per_h = sigma * rng.normal(0.0, 0.3, n)
    offset_ms = rng.integers(0, interval_ms, n)
    rel_ms = offset_ms[:, None] + np.arange(n_readings, dtype=np.int64)[None, :] * interval_ms
    day_frac = ((start_ms + rel_ms) % _DAY_MS) / _DAY_MS
    values = (
        baseline[:, None]
        + amplitude[:, None] * np.sin(2 * np.pi * day_frac + phase[:, None])
        + drift_per_h[:, None] * (rel_ms / 3_600_000.0)
        + sigma[:, None] * rng.standard_normal((n, n_readings))
    )
    return values, sigma, offset_ms


def _chunk_events(
    rng: np.random.Generator, n_readings: int, anomaly_rate: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly events for one chunk: ``(device, kind, start, length, signed magnitude)``.

    Each device has its own anomaly rate (gamma around the fleet rate) and its own mix of kinds
    (Dirichlet), so the devices are non-IID in what goes wrong as well as in their levels.
    """
    n = _CHUNK
    rate = anomaly_rate * rng.gamma(2.0, 0.5, n)
    mix = rng.dirichlet(np.full(5, 0.6), n)
    mean_len = mix @ ((_LEN_LO[1:] + _LEN_HI[1:]) / 2.0)
    counts = rng.poisson(rate * n_readings / mean_len)
    dev = np.repeat(np.arange(n), counts)
    cum = np.cumsum(mix, axis=1)[dev]
    kind = 1 + np.minimum((rng.random(len(dev))[:, None] > cum).sum(axis=1), 4)
    lo, hi = _LEN_LO[kind], _LEN_HI[kind]
    length = np.minimum(lo + (rng.random(len(dev)) * (hi - lo + 1)).astype(np.int64), n_readings)
    start = (rng.random(len(dev)) * (n_readings - length + 1)).astype(np.int64)
    magnitude = _MAG_LO[kind] + rng.random(len(dev)) * (_MAG_HI[kind] - _MAG_LO[kind])
    magnitude *= np.where(rng.random(len(dev)) < 0.5, -1.0, 1.0)
    keep = _non_overlapping(dev, start, length, n_readings)
    return dev[keep], kind[keep], start[keep], length[keep], magnitude[keep]


def _non_overlapping(
    dev: np.ndarray, start: np.ndarray, length: np.ndarray, n_readings: int
) -> np.ndarray:
    """Mask of events to keep so that a device's events neither overlap nor touch.

    One kind per labelled point keeps the ground truth unambiguous, and a normal reading before
    every event gives a stuck stretch a normal value to hold. Greedy in start order per device.
    """
    order = np.lexsort((start, dev))
    stride = n_readings + 2  # offsets devices apart so one running max serves all of them
    begin = dev[order] * stride + start[order]
    end = begin + length[order]  # first index after the event
    prev_end = np.maximum.accumulate(np.concatenate(([-1], end[:-1])))
    keep = np.zeros(len(dev), dtype=bool)
    keep[order] = begin > prev_end
    return keep


def _inject(
    rng: np.random.Generator,
    values: np.ndarray,
    sigma: np.ndarray,
    events: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Apply the events to ``values`` in place, vectorised over all their points; return kinds.

    Spikes and level shifts add several sigmas; noise bursts add noise of 3-6 sigmas; drift ramps
    up to 3-6 sigmas (early points are subtle); stuck stretches repeat the last value before them.
    """
    dev, kind, start, length, magnitude = events
    ev = np.repeat(np.arange(len(dev)), length)
    pos = np.arange(len(ev)) - np.repeat(np.cumsum(length) - length, length)
    d, t, k = dev[ev], start[ev] + pos, kind[ev]
    scale = sigma[d] * magnitude[ev]
    effect = np.where(k == _DRIFT, scale * (pos + 1) / length[ev], scale)
    effect = np.where(k == _BURST, np.abs(scale) * rng.standard_normal(len(ev)), effect)
    additive = k != _STUCK
    np.add.at(values, (d[additive], t[additive]), effect[additive])
    stuck = ~additive
    held = values[d[stuck], np.maximum(start[ev][stuck] - 1, 0)]
    values[d[stuck], t[stuck]] = held
    kinds = np.zeros(values.shape, dtype=np.int8)
    kinds[d, t] = k
    return kinds


def synthetic_fleet_arrays(
    num_devices: int = 2407,
    readings_per_device: int = 200,
    anomaly_rate: float = 0.02,
    seed: int = 42,
    start: datetime = datetime(2025, 11, 7, tzinfo=UTC),
    interval_s: float = 10.0,
) -> FleetArrays:
    """Generate the synthetic fleet as columnar numpy arrays in event-time order.

    Vectorised over blocks of devices (no per-reading Python), so 100,000 devices x 200 readings
    fit in memory (~0.5 GB) and take seconds. Deterministic for a seed; device i's stream is
    the same whatever ``num_devices`` is. Device i samples at ``start + offset_i + k*interval``
    with ``0 <= offset_i < interval``, so the event-time order is: by k, then offset, then device.
    """
    if num_devices < 1 or readings_per_device < 1:
        raise ValueError("num_devices and readings_per_device must be >= 1")
    if not 0.0 <= anomaly_rate <= 0.5:
        raise ValueError(f"anomaly_rate must be in [0, 0.5], got {anomaly_rate}")
    interval_ms = round(interval_s * 1000)
    if interval_ms < 1:
        raise ValueError(f"interval_s must be at least 1 ms, got {interval_s}")
    start_ms = _to_us(start) // 1000
    n, t_len = num_devices, readings_per_device
    # [time step, device] layout: event order is then each row permuted the same way, in place.
    values = np.empty((t_len, n))
    kinds = np.empty((t_len, n), dtype=np.int8)
    offsets = np.empty(n, dtype=np.int64)
    for c, lo in enumerate(range(0, n, _CHUNK)):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(c,))))
        vals, sigma, offset_ms = _chunk_signal(rng, t_len, start_ms, interval_ms)
        chunk_kinds = _inject(rng, vals, sigma, _chunk_events(rng, t_len, anomaly_rate))
        hi = min(lo + _CHUNK, n)
        values[:, lo:hi] = vals[: hi - lo].T
        kinds[:, lo:hi] = chunk_kinds[: hi - lo].T
        offsets[lo:hi] = offset_ms[: hi - lo]
    perm = np.argsort(offsets, kind="stable")  # ties in offset: device order
    for row in range(t_len):  # one row at a time keeps the peak at one copy of the data
        values[row] = values[row, perm]
        kinds[row] = kinds[row, perm]
    steps = np.arange(t_len, dtype=np.int64)[:, None] * interval_ms
    return FleetArrays(
        device=np.tile(perm.astype(np.int32), t_len),
        timestamp_ms=(start_ms + offsets[perm][None, :] + steps).ravel(),
        value=values.ravel(),
        label=(kinds > 0).astype(np.int8).ravel(),
        anomaly_kind=kinds.ravel(),
        device_ids=_device_ids(n),
    )


def fleet_readings(
    arrays: FleetArrays, report: LoadReport | None = None, block: int = 65_536
) -> Iterator[Reading]:
    """Iterate pre-generated fleet arrays as Readings (in their order, i.e. event time)."""
    report = report if report is not None else LoadReport()
    ids = arrays.device_ids
    for lo in range(0, len(arrays), block):
        sl = slice(lo, lo + block)
        for d, ms, v, lab in zip(
            arrays.device[sl].tolist(),
            arrays.timestamp_ms[sl].tolist(),
            arrays.value[sl].tolist(),
            arrays.label[sl].tolist(),
            strict=True,
        ):
            report.rows += 1
            yield Reading(ids[d], _EPOCH + timedelta(milliseconds=ms), v, lab)


def synthetic_fleet(
    num_devices: int = 2407,
    readings_per_device: int = 200,
    anomaly_rate: float = 0.02,
    seed: int = 42,
    start: datetime = datetime(2025, 11, 7, tzinfo=UTC),
    interval_s: float = 10.0,
    report: LoadReport | None = None,
) -> Iterator[Reading]:
    """The embedded synthetic IoT fleet as a stream of labelled Readings, in event-time order.

    See :func:`synthetic_fleet_arrays` for the model; this only iterates its arrays.
    """
    arrays = synthetic_fleet_arrays(
        num_devices, readings_per_device, anomaly_rate, seed, start, interval_s
    )
    yield from fleet_readings(arrays, report)


# --------------------------------------------------------------------------------------------
# 2. Generic CSV
# --------------------------------------------------------------------------------------------


def csv_readings(path: str | Path, report: LoadReport | None = None) -> Iterator[Reading]:
    """Readings from a CSV with header ``timestamp,device_id,value[,label]`` (any column order).

    Timestamps: ISO 8601 (naive = UTC, any offset converted to UTC) or epoch seconds (a plain
    number). Empty label = unlabelled. The whole file is read, then sorted into event time.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    header = _read_header(path)
    cols = _column_index(header, ["timestamp", "device_id", "value"], str(path))
    label_col = header.index("label") if "label" in header else None

    def parse(row: list[str], _line: int) -> tuple[int, str, float, int | None]:
        device = row[cols["device_id"]].strip()
        if not device:
            raise _BadRow("missing device")
        ts = _parse_csv_time_us(row[cols["timestamp"]])
        value = _parse_value(row[cols["value"]])
        label = None if label_col is None else _parse_label(row[label_col], optional=True)
        return ts, device, value, label

    yield from _read_rows(path, tally, parse, len(header)).sorted_readings(tally)


# --------------------------------------------------------------------------------------------
# 3. SKAB
# --------------------------------------------------------------------------------------------

SKAB_FOLDERS: tuple[str, ...] = ("valve1", "valve2", "other")
_SKAB_NON_SENSOR = {"datetime", "anomaly", "changepoint"}


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def skab_files(root: str | Path, include_anomaly_free: bool = True) -> list[tuple[str, Path]]:
    """``(experiment, path)`` for every SKAB file, in a fixed order: ``valve1_0`` .. ``other_14``,
    then ``anomaly_free``. Numeric file stems sort numerically (2 before 10)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SKAB directory not found: {root}")
    files: list[tuple[str, Path]] = []
    for folder in SKAB_FOLDERS:
        paths = sorted((root / folder).glob("*.csv"), key=lambda p: (len(p.stem), p.stem))
        files += [(_sanitize(f"{folder}_{p.stem}"), p) for p in paths]
    free = root / "anomaly-free" / "anomaly-free.csv"
    if include_anomaly_free and free.is_file():
        files.append(("anomaly_free", free))
    if not files:
        raise FileNotFoundError(f"no SKAB CSV files under {root}")
    return files


def _skab_file(path: Path, experiment: str, tally: _Tally, columns: _Columns) -> None:
    """One SKAB file -> one device per sensor column; a bad field costs only that reading."""
    header = _read_header(path, ";")
    cols = _column_index(header, ["datetime"], str(path))
    sensors = [(i, name) for i, name in enumerate(header) if name not in _SKAB_NON_SENSOR]
    devices = [(i, f"skab_{experiment}_{_sanitize(name)}") for i, name in sensors]
    label_col = header.index("anomaly") if "anomaly" in header else None
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader, None)
        for row in reader:
            if not row:
                continue
            where = f"{path.parent.name}/{path.name} line {reader.line_num}"
            try:
                if len(row) != len(header):
                    raise _BadRow("wrong field count")
                ts = _parse_iso_us(row[cols["datetime"]].strip())
                label = None if label_col is None else _parse_label(row[label_col], optional=True)
            except _BadRow as exc:
                tally.bad(str(exc), where, count=len(devices))
                continue
            for i, device in devices:
                try:
                    columns.add(ts, device, _parse_value(row[i]), label)
                except _BadRow as exc:
                    tally.bad(str(exc), where)


def skab_readings(
    root: str | Path = SHARED_DATA_DIR / "skab",
    report: LoadReport | None = None,
    include_anomaly_free: bool = True,
) -> Iterator[Reading]:
    """SKAB in its native format: one univariate device per (experiment, sensor).

    Device ids: ``skab_<folder>_<file stem>_<sensor>`` with non-alphanumerics as ``_``, e.g.
    ``skab_valve1_3_Pressure``, ``skab_other_14_Volume_Flow_RateRMS``,
    ``skab_anomaly_free_Current``. Label = the ``anomaly`` column; the anomaly-free file has no
    such column, so its readings are unlabelled (None), not assumed normal. Timestamps are the
    bench's local wall-clock times, read as UTC. The ``changepoint`` column is not used.
    """
    tally = _Tally(report, f"skab:{root}")
    columns = _Columns()
    for experiment, path in skab_files(root, include_anomaly_free):
        _skab_file(path, experiment, tally, columns)
    yield from columns.sorted_readings(tally)


# --------------------------------------------------------------------------------------------
# 4. WSN (TelosB motes)
# --------------------------------------------------------------------------------------------

#: The WSN file has no wall-clock time, only a per-mote sequence number sampled every 5 s; this
#: fixed, arbitrary start anchors it so replays are reproducible.
WSN_START = datetime(2010, 1, 1, tzinfo=UTC)
WSN_INTERVAL_S = 5.0
_WSN_NON_FIELDS = ("reading", "mote_id", "label")


def wsn_readings(
    path: str | Path = SHARED_DATA_DIR / "wsn" / "data.csv",
    field: str = "temperature",
    report: LoadReport | None = None,
    start: datetime = WSN_START,
    interval_s: float = WSN_INTERVAL_S,
) -> Iterator[Reading]:
    """One field (``temperature`` or ``humidity``) of the WSN data; device ``wsn_mote_<id>``.

    Time: ``reading`` is a per-mote sequence number (1, 2, ... per mote), so the timestamp is
    ``start + reading * 5 s``. Motes are assumed to be sampled in step (same reading number =
    same time), which is an approximation: the motes have different reading counts.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    header = _read_header(path)
    if field in _WSN_NON_FIELDS:
        raise ValueError(f"field must be a measurement column, not {field!r}")
    cols = _column_index(header, ["reading", "mote_id", "label", field], str(path))
    start_us, step_us = _to_us(start), round(interval_s * 1_000_000)

    def parse(row: list[str], _line: int) -> tuple[int, str, float, int | None]:
        mote = row[cols["mote_id"]].strip()
        if not mote:
            raise _BadRow("missing device")
        seq = row[cols["reading"]].strip()
        if not seq.isdigit():
            raise _BadRow("unparsable timestamp")
        value = _parse_value(row[cols[field]])
        label = _parse_label(row[cols["label"]], optional=True)
        return _checked_us(start_us + int(seq) * step_us), f"wsn_mote_{mote}", value, label

    yield from _read_rows(path, tally, parse, len(header)).sorted_readings(tally)


# --------------------------------------------------------------------------------------------
# 5. Edge-IIoTset
# --------------------------------------------------------------------------------------------

_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, 1)}
# "2021 11:44:10.081753000": year and time of day only (the common form in DNN-EdgeIIoT).
_EDGE_PARTIAL = re.compile(r"^(\d{4})\s+(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?$")
# Wireshark's absolute time, "Nov 14, 2021 13:42:08.797669000 EET" (zone name ignored -> UTC).
_EDGE_WIRESHARK = re.compile(
    r"^([A-Z][a-z]{2})\s+(\d{1,2}),\s+(\d{4})\s+(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:\s+[A-Za-z+\-0-9]+)?$"
)
_EDGE_MISSING = {"", "0", "0.0"}  # how Edge-IIoTset writes an absent field


def _edge_datetime(parts: Sequence[str | None]) -> int:
    """``(year, month, day, hour, minute, second, fraction)`` strings -> epoch microseconds."""
    year, month, day, hour, minute, second, frac = parts
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        ts = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, UTC
        )
    except (TypeError, ValueError) as exc:
        raise _BadRow("unparsable timestamp") from exc
    return _to_us(ts)


def parse_edge_iiot_time(raw: str) -> int:
    """Epoch microseconds from an Edge-IIoTset ``frame.time``; raises ValueError if unusable.

    Accepted: ``"2021 11:44:10.081753000"`` (year + time of day; the day is unknown, so it is
    placed on 1 January of that year: order within a capture is kept, the calendar date is not),
    Wireshark's ``"Nov 14, 2021 13:42:08.797669000 EET"`` (zone abbreviation ignored, read as
    UTC), and ISO 8601 datetimes. Anything else - notably the bare numbers and IP addresses of
    the dataset's column-shifted MITM/DDoS_UDP rows - is refused.
    """
    text = raw.strip()
    if m := _EDGE_PARTIAL.match(text):
        return _edge_datetime((m[1], "1", "1", m[2], m[3], m[4], m[5]))
    if m := _EDGE_WIRESHARK.match(text):
        if m[1] not in _MONTHS:
            raise _BadRow("unparsable timestamp")
        return _edge_datetime((m[3], str(_MONTHS[m[1]]), m[2], m[4], m[5], m[6], m[7]))
    if re.match(r"^\d{4}-\d{2}-\d{2}[T ]", text):
        return _parse_iso_us(text)
    raise _BadRow("unparsable timestamp")


def edge_iiot_readings(
    path: str | Path, value_field: str = "tcp.len", report: LoadReport | None = None
) -> Iterator[Reading]:
    """Edge-IIoTset (``DNN-EdgeIIoT-dataset.csv``): device = ``ip.src_host``, value =
    ``value_field``, label = ``Attack_label``, time = ``frame.time`` (see
    :func:`parse_edge_iiot_time`). A source host of ``""``, ``0`` or ``0.0`` (how the dataset
    writes an absent field) counts as a missing device.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    header = _read_header(path)
    wanted = ["frame.time", "ip.src_host", "Attack_label", value_field]
    cols = _column_index(header, wanted, str(path))

    def parse(row: list[str], _line: int) -> tuple[int, str, float, int | None]:
        ts = parse_edge_iiot_time(row[cols["frame.time"]])  # first: it exposes shifted rows
        device = row[cols["ip.src_host"]].strip()
        if device in _EDGE_MISSING:
            raise _BadRow("missing device")
        value = _parse_value(row[cols[value_field]])
        return ts, device, value, _parse_label(row[cols["Attack_label"]], optional=False)

    yield from _read_rows(path, tally, parse, len(header)).sorted_readings(tally)


# --------------------------------------------------------------------------------------------
# 6. Dispatcher
# --------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Iterator[Reading]]] = {
    "synthetic": synthetic_fleet,
    "csv": csv_readings,
    "skab": skab_readings,
    "wsn": wsn_readings,
    "edge_iiot": edge_iiot_readings,
}
SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)


def open_source(name: str, **options: Any) -> Iterator[Reading]:
    """A source by name (for CLIs and config files); ``options`` go to its function.

    Every file-backed source takes ``path``: for ``skab`` it is the folder (alias of ``root``),
    so a CLI can pass one ``--path`` whatever the source.
    """
    try:
        source = SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown source {name!r}; valid names: {', '.join(sorted(SOURCES))}"
        ) from None
    if name == "skab" and "path" in options:
        options["root"] = options.pop("path")
    return source(**options)
