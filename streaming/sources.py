"""Data sources: everything the replay producer can stream, as ``Reading``s in event-time order.

Every source yields readings sorted by event time, ties broken deterministically (by device, then
by position in the source), because the stream's consumers keep per-device state and the Kafka
key is ``device_id``: replaying the same source twice must produce the same stream.

A reading carries one value per channel (``Reading.channels``, sorted names); the file loaders
default to one multivariate reading per row and can select a single column instead, which gives
the univariate form (channels ``("value",)``, a plain number on the wire).

Bad input is a fact of life with real files, so no loader stops on a bad row: it is counted in a
:class:`LoadReport` (reason -> count), and the first row of each reason is logged as a warning.
Rows the stream contract would refuse (see :mod:`streaming.messages`: times outside
[1970, 2100), |values| above ``MAGNITUDE_LIMIT``, malformed device ids) are bad rows too, so
whatever a loader yields is accepted by the decoder. A bad header is a file error (ValueError).

Sources:

- :func:`synthetic_fleet` - an embedded, seeded IoT fleet with labelled anomalies of several kinds
  (columnar form: :func:`synthetic_fleet_arrays`).
- :func:`csv_readings` - generic CSV, narrow ``timestamp,device_id,value[,label]`` or wide
  ``timestamp,device_id,<channel>...[,label]``.
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

from streaming.messages import (
    MAGNITUDE_LIMIT,
    MAX_CHANNEL_NAME_CHARS,
    MAX_CHANNELS,
    MAX_DEVICE_ID_CHARS,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    SINGLE_CHANNEL,
    Reading,
    name_problem,
)

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# The event-time window of the stream contract, in microseconds: [MIN, MAX).
_MIN_US = MIN_TIMESTAMP_MS * 1000
_MAX_US = MAX_TIMESTAMP_MS * 1000

#: Where the shared test data lives when running from the repository: ``<repo>/../shared/data``.
#: Anchored on this file rather than the working directory so it works from any directory.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------------------------
# Bad-row accounting
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a loader read. Bad rows are counted, never fatal, so a messy file still replays.

    ``rows`` counts readings yielded so far; ``bad_rows`` counts readings that were dropped. A
    multivariate reading is one row of the file; in SKAB's per-sensor mode (several readings per
    line) both count readings, not lines.
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


def _parse_iso_us(raw: str) -> int:
    """ISO 8601 (``T`` or space, optional fraction of any length, ``Z`` or offset; naive = UTC)."""
    try:
        return _to_us(datetime.fromisoformat(raw))
    except (ValueError, OverflowError) as exc:
        raise _BadRow("unparsable timestamp") from exc


_EPOCH_UNITS_US = ((1e11, 1_000_000), (1e14, 1_000), (1e17, 1), (1e20, 0.001))
"""A plain-number time's unit by its magnitude: below 1e11 seconds (1e11 s is the year 5138),
below 1e14 milliseconds, below 1e17 microseconds, below 1e20 nanoseconds (each up to the same
year), as microseconds per unit."""


def _parse_csv_time_us(raw: str) -> int:
    """Generic CSV time: a plain number is epoch seconds, milliseconds, microseconds or
    nanoseconds (told apart by magnitude, :data:`_EPOCH_UNITS_US`), anything else must be
    ISO 8601."""
    raw = raw.strip()
    if _NUMBER.match(raw):
        number = float(raw)
        for limit, us_per_unit in _EPOCH_UNITS_US:
            if abs(number) < limit:
                return round(number * us_per_unit)
        raise _BadRow("timestamp out of range")
    return _parse_iso_us(raw)


def _value_reason(value: float) -> str:
    return "non-finite value" if not math.isfinite(value) else "value out of range"


def _parse_value(raw: str) -> float:
    """One channel value: a finite float within the contract's MAGNITUDE_LIMIT."""
    try:
        value = float(raw)
    except ValueError as exc:
        raise _BadRow("unparsable value") from exc
    if -MAGNITUDE_LIMIT <= value <= MAGNITUDE_LIMIT:  # NaN fails too
        return value
    raise _BadRow(_value_reason(value))


def _parse_values(cells: list[str]) -> list[float]:
    """Several channel values of one row; any bad one makes the whole row bad."""
    try:
        values = [float(cell) for cell in cells]
    except ValueError as exc:
        raise _BadRow("unparsable value") from exc
    for value in values:
        if not -MAGNITUDE_LIMIT <= value <= MAGNITUDE_LIMIT:
            raise _BadRow(_value_reason(value))
    return values


_LABEL_WORDS = {"true": 1, "false": 0, "yes": 1, "no": 0}


def _parse_label(raw: str | None, *, optional: bool) -> int | None:
    """0/1 in any spelling the datasets use (``1``, ``1.0``, ``true``/``false``, ``yes``/``no``,
    any case); empty means unlabelled if allowed."""
    text = (raw or "").strip()
    if not text and optional:
        return None
    word = _LABEL_WORDS.get(text.lower())
    if word is not None:
        return word
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


def _channel_layout(columns: Sequence[tuple[int, str]], source: str) -> tuple[list[int], tuple]:
    """``(column index, channel name)`` pairs -> (column indexes in channel order, channels).

    Channels are sorted by name, as the Reading contract wants; a name the contract refuses, a
    repeated name or too many channels is a file error (the header is wrong, not a row).
    """
    ordered = sorted(columns, key=lambda c: c[1])
    names = tuple(name for _, name in ordered)
    if not names:
        raise ValueError(f"{source}: no value or channel column")
    if len(names) > MAX_CHANNELS:
        raise ValueError(f"{source}: {len(names)} channels, more than the limit {MAX_CHANNELS}")
    for name in names:
        problem = name_problem(name, "channel name", MAX_CHANNEL_NAME_CHARS)
        if problem:
            raise ValueError(f"{source}: {problem}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: channel(s) {repeated} appear more than once")
    return [i for i, _ in ordered], names


# --------------------------------------------------------------------------------------------
# Columnar buffer: read everything compactly, sort once, yield Readings lazily
# --------------------------------------------------------------------------------------------


class _Columns:
    """Parsed rows in typed arrays (~17 bytes per row + 8 per channel value) rather than
    millions of objects, so a whole file can be held and sorted into event-time order before
    the first reading is yielded."""

    def __init__(self) -> None:
        self.ts_us = array("q")
        self.device = array("i")
        self.label = array("b")  # -1 = unlabelled
        self.layout = array("i")  # index into self.layouts
        self.values = array("d")  # every row's channel values, concatenated
        self.device_ids: list[str] = []
        self._devices: dict[str, int] = {}
        self.layouts: list[tuple[str, ...]] = []
        self._layouts: dict[tuple[str, ...], int] = {}

    def add_layout(self, channels: tuple[str, ...]) -> int:
        """Register a channel tuple (sorted, already validated); returns its index for add()."""
        idx = self._layouts.get(channels)
        if idx is None:
            idx = self._layouts[channels] = len(self.layouts)
            self.layouts.append(channels)
        return idx

    def add(
        self,
        ts_us: int,
        device_id: str,
        values: Sequence[float],
        label: int | None,
        layout: int,
    ) -> None:
        """One row; raises _BadRow (nothing stored) for what the stream contract refuses."""
        if not _MIN_US <= ts_us < _MAX_US:
            raise _BadRow("timestamp out of range")
        idx = self._devices.get(device_id)
        if idx is None:
            if name_problem(device_id, "device_id", MAX_DEVICE_ID_CHARS):
                raise _BadRow("invalid device id")
            idx = self._devices[device_id] = len(self.device_ids)
            self.device_ids.append(device_id)
        self.ts_us.append(ts_us)
        self.device.append(idx)
        self.label.append(-1 if label is None else label)
        self.layout.append(layout)
        self.values.extend(values)

    def sorted_readings(self, tally: _Tally, block: int = 65_536) -> Iterator[Reading]:
        """Event-time order; ties by device id, then by position in the source."""
        n = len(self.ts_us)
        if n == 0:
            logger.info("%s: %s", tally.source, tally.report.as_dict())
            return
        ts = np.frombuffer(self.ts_us, dtype=np.int64)
        dev = np.frombuffer(self.device, dtype=np.int32)
        rank = np.empty(len(self.device_ids), dtype=np.int64)  # device id -> its sort position
        rank[np.argsort(np.array(self.device_ids, dtype=str))] = np.arange(len(rank))
        order = np.lexsort((np.arange(n), rank[dev], ts))  # sorted on microseconds
        ms = ts // 1000  # floor: non-negative, and order on ms stays non-decreasing
        labels = np.frombuffer(self.label, dtype=np.int8)
        layout = np.frombuffer(self.layout, dtype=np.int32)
        flat = np.frombuffer(self.values, dtype=np.float64)
        widths = np.array([len(c) for c in self.layouts], dtype=np.int64)[layout]
        width = int(widths[0]) if np.all(widths == widths[0]) else 0  # 0: rows differ
        if width:
            matrix = flat.reshape(n, width)
        else:
            starts = np.cumsum(widths) - widths
        layouts, ids = self.layouts, self.device_ids
        for lo in range(0, n, block):
            idx = order[lo : lo + block]
            if width:
                values = map(tuple, matrix[idx].tolist())
            else:
                values = (
                    tuple(flat[s : s + w].tolist())
                    for s, w in zip(starts[idx].tolist(), widths[idx].tolist(), strict=True)
                )
            for t, d, v, lab, lay in zip(
                ms[idx].tolist(),
                dev[idx].tolist(),
                values,
                labels[idx].tolist(),
                layout[idx].tolist(),
                strict=True,
            ):
                tally.report.rows += 1
                yield Reading(ids[d], t, v, None if lab < 0 else lab, layouts[lay])
        logger.info("%s: %s", tally.source, tally.report.as_dict())


#: A row parser: ``(row, line number) -> (event time in µs, device id, values, label)``.
_RowParser = Callable[[list[str], int], tuple[int, str, Sequence[float], int | None]]


def _read_rows(
    path: Path,
    tally: _Tally,
    parse: _RowParser,
    n_fields: int,
    channels: tuple[str, ...],
    delimiter: str = ",",
) -> _Columns:
    """Run ``parse(row, line_no)`` over every data row; bad rows go to the tally."""
    columns = _Columns()
    layout = columns.add_layout(channels)
    add = columns.add
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)  # header, already read by the caller
        for row in _csv_rows(reader, tally, str(path)):
            if len(row) != n_fields:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line: not a row at all
                tally.bad("wrong field count", f"line {reader.line_num}")
                continue
            try:
                ts, device, values, label = parse(row, reader.line_num)
                add(ts, device, values, label, layout)
            except _BadRow as exc:
                tally.bad(str(exc), f"line {reader.line_num}")
    return columns


def _open_text(path: Path):
    """A data file as text: UTF-8 with or without a BOM; an undecodable byte becomes U+FFFD
    (so it costs at most its row, as an unparsable field) instead of stopping the load."""
    return path.open(newline="", encoding="utf-8-sig", errors="replace")


def _csv_rows(reader: Any, tally: _Tally, source: str) -> Iterator[list[str]]:
    """``reader``'s rows; a line the csv module cannot split (e.g. a field beyond its size
    limit) is a bad row, not the end of the load."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            tally.bad("unreadable line", f"{source} line {reader.line_num} ({exc})")
            continue
        yield row


def _read_header(path: Path, delimiter: str = ",") -> list[str]:
    with _open_text(path) as handle:
        try:
            header = next(csv.reader(handle, delimiter=delimiter), None)
        except csv.Error as exc:
            raise ValueError(f"{path}: unreadable header ({exc})") from exc
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
    """Iterate pre-generated fleet arrays as single-channel Readings (in their order, i.e.
    event time)."""
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
            yield Reading(ids[d], ms, (v,), lab)


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

_CSV_NON_CHANNELS = ("timestamp", "device_id", "label")


def csv_readings(path: str | Path, report: LoadReport | None = None) -> Iterator[Reading]:
    """Readings from a CSV with a header, in either of two forms (any column order):

    - narrow ``timestamp,device_id,value[,label]``: one channel (``Reading.channels`` is
      ``("value",)``, a plain number on the wire);
    - wide ``timestamp,device_id,<channel>...[,label]``: every other column is a channel, named
      by its header (sorted by name in the Reading).

    Separated by commas, or by semicolons or tabs where the header line has no comma; the
    names ``timestamp``, ``device_id`` and ``label`` in any case. Labels 0/1 (also ``1.0``,
    ``true``/``false``, ``yes``/``no``).

    The form follows the header: exactly one ``value`` column besides timestamp, device_id and
    label is narrow, anything else wide. Timestamps: ISO 8601 (naive = UTC, any offset converted
    to UTC) or an epoch number (seconds, or milliseconds, microseconds,
    nanoseconds by its magnitude). Empty label = unlabelled. A row with a bad field
    (an unparsable number, a missing device, a wrong field count ...) is counted and skipped.
    The whole file is read into typed arrays, then sorted into event time.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    delimiter = _sniff_delimiter(path)
    # The reserved columns in any case ("Timestamp", "LABEL"); channels keep their names.
    header = [
        name.lower() if name.lower() in _CSV_NON_CHANNELS else name
        for name in _read_header(path, delimiter)
    ]
    cols = _column_index(header, ["timestamp", "device_id"], str(path))
    ts_col, dev_col = cols["timestamp"], cols["device_id"]
    label_col = header.index("label") if "label" in header else None
    others = [(i, name) for i, name in enumerate(header) if name not in _CSV_NON_CHANNELS]
    if [name for _, name in others] == ["value"]:
        value_cols, channels = [others[0][0]], SINGLE_CHANNEL
    else:
        value_cols, channels = _channel_layout(others, str(path))

    def parse(row: list[str], _line: int) -> tuple[int, str, list[float], int | None]:
        device = row[dev_col].strip()
        if not device:
            raise _BadRow("missing device")
        ts = _parse_csv_time_us(row[ts_col])
        values = _parse_values([row[i] for i in value_cols])
        label = None if label_col is None else _parse_label(row[label_col], optional=True)
        return ts, device, values, label

    columns = _read_rows(path, tally, parse, len(header), channels, delimiter)
    yield from columns.sorted_readings(tally)


def _sniff_delimiter(path: Path) -> str:
    """``,`` unless the header line has none and has ``;`` or a tab (a European-locale
    spreadsheet's export, a TSV)."""
    with _open_text(path) as handle:
        line = handle.readline()
    if "," in line:
        return ","
    for candidate in (";", "\t"):
        if candidate in line:
            return candidate
    return ","


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


def _skab_file(
    path: Path, experiment: str, tally: _Tally, columns: _Columns, per_sensor: bool
) -> None:
    """One SKAB file -> one multivariate device, or one device per sensor column."""
    header = _read_header(path, ";")
    cols = _column_index(header, ["datetime"], str(path))
    sensors = [
        (i, _sanitize(name)) for i, name in enumerate(header) if name not in _SKAB_NON_SENSOR
    ]
    label_col = header.index("anomaly") if "anomaly" in header else None
    if per_sensor:
        layout = columns.add_layout(SINGLE_CHANNEL)
        devices = [(i, f"skab_{experiment}_{name}") for i, name in sensors]
    else:
        sensor_cols, channels = _channel_layout(sensors, str(path))
        layout = columns.add_layout(channels)
        device = f"skab_{experiment}"
    per_row = len(devices) if per_sensor else 1  # readings a bad line costs
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader, None)
        for row in _csv_rows(reader, tally, str(path)):
            if not row:
                continue
            where = f"{path.parent.name}/{path.name} line {reader.line_num}"
            try:
                if len(row) != len(header):
                    raise _BadRow("wrong field count")
                ts = _parse_iso_us(row[cols["datetime"]].strip())
                label = None if label_col is None else _parse_label(row[label_col], optional=True)
                if not per_sensor:  # a bad field costs the whole (multivariate) reading
                    values = _parse_values([row[i] for i in sensor_cols])
                    columns.add(ts, device, values, label, layout)
                    continue
            except _BadRow as exc:
                tally.bad(str(exc), where, count=per_row)
                continue
            for i, sensor_device in devices:  # per sensor: a bad field costs only its reading
                try:
                    columns.add(ts, sensor_device, (_parse_value(row[i]),), label, layout)
                except _BadRow as exc:
                    tally.bad(str(exc), where)


def skab_readings(
    root: str | Path = SHARED_DATA_DIR / "skab",
    report: LoadReport | None = None,
    include_anomaly_free: bool = True,
    per_sensor: bool = False,
) -> Iterator[Reading]:
    """SKAB in its native format.

    Default: one multivariate device per experiment file, ``skab_<folder>_<file stem>`` (e.g.
    ``skab_valve1_3``, ``skab_other_14``, ``skab_anomaly_free``), whose channels are the 8
    sensors with non-alphanumerics as ``_``: ``Accelerometer1RMS``, ``Accelerometer2RMS``,
    ``Current``, ``Pressure``, ``Temperature``, ``Thermocouple``, ``Voltage``,
    ``Volume_Flow_RateRMS``. A bad field drops its row (counted with its reason).

    ``per_sensor=True``: one univariate device per (experiment, sensor),
    ``skab_<folder>_<file stem>_<sensor>``, e.g. ``skab_valve1_3_Pressure``; a bad field drops
    only that sensor's reading.

    Label = the ``anomaly`` column; the anomaly-free file has no such column, so its readings are
    unlabelled (None), not assumed normal. Timestamps are the bench's local wall-clock times,
    read as UTC. The ``changepoint`` column is not used.
    """
    tally = _Tally(report, f"skab:{root}")
    columns = _Columns()
    for experiment, path in skab_files(root, include_anomaly_free):
        _skab_file(path, experiment, tally, columns, per_sensor)
    yield from columns.sorted_readings(tally)


# --------------------------------------------------------------------------------------------
# 4. WSN (TelosB motes)
# --------------------------------------------------------------------------------------------

#: The WSN file has no wall-clock time, only a per-mote sequence number sampled every 5 s; this
#: fixed, arbitrary start anchors it so replays are reproducible.
WSN_START = datetime(2010, 1, 1, tzinfo=UTC)
WSN_INTERVAL_S = 5.0
#: The measurements a WSN reading carries by default (``indoor`` is a 0/1 placement flag).
WSN_CHANNELS: tuple[str, ...] = ("humidity", "temperature")
_WSN_NON_FIELDS = ("reading", "mote_id", "label")


def wsn_readings(
    path: str | Path = SHARED_DATA_DIR / "wsn" / "data.csv",
    field: str | None = None,
    report: LoadReport | None = None,
    start: datetime = WSN_START,
    interval_s: float = WSN_INTERVAL_S,
) -> Iterator[Reading]:
    """The WSN data, one device ``wsn_mote_<id>`` per mote.

    Default: channels ``humidity`` and ``temperature``. ``field="temperature"`` (or any other
    measurement column) selects that one column as a univariate reading (channels
    ``("value",)``).

    Time: ``reading`` is a per-mote sequence number (1, 2, ... per mote), so the timestamp is
    ``start + reading * 5 s``. Motes are assumed to be sampled in step (same reading number =
    same time), which is an approximation: the motes have different reading counts.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    header = _read_header(path)
    if field in _WSN_NON_FIELDS:
        raise ValueError(f"field must be a measurement column, not {field!r}")
    names = list(WSN_CHANNELS) if field is None else [field]
    cols = _column_index(header, ["reading", "mote_id", "label", *names], str(path))
    if field is None:
        value_cols, channels = _channel_layout([(cols[n], n) for n in names], str(path))
    else:
        value_cols, channels = [cols[field]], SINGLE_CHANNEL
    start_us, step_us = _to_us(start), round(interval_s * 1_000_000)

    def parse(row: list[str], _line: int) -> tuple[int, str, list[float], int | None]:
        mote = row[cols["mote_id"]].strip()
        if not mote:
            raise _BadRow("missing device")
        seq = row[cols["reading"]].strip()
        if not (seq.isascii() and seq.isdigit()) or len(seq) > 15:
            raise _BadRow("unparsable timestamp")
        values = _parse_values([row[i] for i in value_cols])
        label = _parse_label(row[cols["label"]], optional=True)
        return start_us + int(seq) * step_us, f"wsn_mote_{mote}", values, label

    yield from _read_rows(path, tally, parse, len(header), channels).sorted_readings(tally)


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

#: Edge-IIoTset columns that are not numeric features, so never channels: the time, the hosts
#: (device id and peer), the labels, and the protocol fields whose values are text (addresses,
#: URIs, payloads and hex dumps, HTTP methods/versions/referers, DNS names, MQTT topics,
#: messages, protocol names and flag strings; ``tcp.srcport`` mixes text into its numbers in
#: the published file). Every other column is a channel and must parse as a number in each row.
EDGE_IIOT_NON_FEATURES: tuple[str, ...] = (
    "frame.time",
    "ip.src_host",
    "ip.dst_host",
    "Attack_label",
    "Attack_type",
    "arp.dst.proto_ipv4",
    "arp.src.proto_ipv4",
    "http.file_data",
    "http.request.uri.query",
    "http.request.method",
    "http.referer",
    "http.request.full_uri",
    "http.request.version",
    "tcp.options",
    "tcp.payload",
    "tcp.srcport",
    "dns.qry.name.len",
    "mqtt.conack.flags",
    "mqtt.msg",
    "mqtt.protoname",
    "mqtt.topic",
)


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
    path: str | Path, value_field: str | None = None, report: LoadReport | None = None
) -> Iterator[Reading]:
    """Edge-IIoTset (``DNN-EdgeIIoT-dataset.csv``): device = ``ip.src_host``, label =
    ``Attack_label``, time = ``frame.time`` (see :func:`parse_edge_iiot_time`).

    Default: every column not in :data:`EDGE_IIOT_NON_FEATURES` is a channel, named by its header
    (``arp.opcode``, ``tcp.len``, ``mqtt.len`` ...; 42 in the published file); a row where one of
    them does not parse as a number is a bad row. ``value_field="tcp.len"`` selects one column
    as a univariate reading (channels ``("value",)``). Memory: the whole file is held as float64
    before sorting, 8 bytes per value (the full 2.2M-row file with 42 channels takes ~0.75 GB;
    a single ``value_field`` ~40 MB).

    A source host of ``""``, ``0`` or ``0.0`` (how the dataset writes an absent field) counts as
    a missing device.
    """
    path = Path(path)
    tally = _Tally(report, str(path))
    header = _read_header(path)
    wanted = ["frame.time", "ip.src_host", "Attack_label"]
    cols = _column_index(header, wanted + ([value_field] if value_field else []), str(path))
    if value_field:
        value_cols, channels = [cols[value_field]], SINGLE_CHANNEL
    else:
        features = [(i, h) for i, h in enumerate(header) if h not in EDGE_IIOT_NON_FEATURES]
        value_cols, channels = _channel_layout(features, str(path))
    time_col, host_col, label_col = (cols[w] for w in wanted)

    def parse(row: list[str], _line: int) -> tuple[int, str, list[float], int | None]:
        ts = parse_edge_iiot_time(row[time_col])  # first: it exposes shifted rows
        device = row[host_col].strip()
        if device in _EDGE_MISSING:
            raise _BadRow("missing device")
        values = _parse_values([row[i] for i in value_cols])
        return ts, device, values, _parse_label(row[label_col], optional=False)

    yield from _read_rows(path, tally, parse, len(header), channels).sorted_readings(tally)


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
    so a CLI can pass one ``--path`` whatever the source. ``per_sensor`` (SKAB's one device per
    sensor) is refused for any other source when true, ignored when false.
    """
    try:
        source = SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown source {name!r}; valid names: {', '.join(sorted(SOURCES))}"
        ) from None
    if name == "skab" and "path" in options:
        options["root"] = options.pop("path")
    if name != "skab" and options.pop("per_sensor", False):
        raise ValueError(f"per_sensor applies to the skab source only, not {name!r}")
    return source(**options)
