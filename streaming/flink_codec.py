"""The Flink job's own byte formats (no PyFlink here, so the main environment tests them):

- :func:`pack` / :func:`unpack`: one device's readings of a message as columns, what the parse
  step hands across the ``key_by`` to the keyed learner;
- :func:`encode_state` / :func:`decode_state`: a device's :class:`~streaming.learner.DeviceState`
  as the bytes of its keyed state.

Both replace pickling (measured in the job's profile, README "Measured"): the learner's
results are the same either way, which ``tests/test_flink_codec.py`` checks.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from streaming.learner import DeviceState, PersonalModel
from streaming.messages import Reading
from streaming.model.detectors import LOGIT_EDGES
from streaming.model.features import N_FEATURES, N_POOLED, FeatureState
from streaming.model.metrics import Confusion

# Header: bytes of the channel names, readings. A format string, not a struct.Struct: the job's
# functions travel pickled (cloudpickle) and a Struct cannot be pickled.
_PACK_HEADER = "<II"


def pack(readings: list[Reading]) -> bytes:
    """One device's readings (same channels) as columns: header, channel names joined by NUL
    (names never hold control characters), int64 event times, int8 labels (-1: none), float64
    values (n × C). The profile: pickling ~50 Reading objects per message across the key_by
    and back cost more than decoding the JSON; this costs a few numpy calls."""
    channels = readings[0].channels
    names = "\x00".join(channels).encode()
    n = len(readings)
    times = np.fromiter((r.timestamp_ms for r in readings), np.int64, n)
    labels = np.fromiter((-1 if r.label is None else r.label for r in readings), np.int8, n)
    values = np.array([r.values for r in readings], dtype=np.float64)
    return b"".join(
        (struct.pack(_PACK_HEADER, len(names), n), names, times.data, labels.data, values.data)
    )


_CHANNELS: dict[bytes, tuple[str, ...]] = {}  # one tuple per channel set (bounded: see unpack)


def unpack(payload: bytes) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """``(channels, values n × C, labels int64, event times int64)`` of :func:`pack`'s bytes."""
    size, n = struct.unpack_from(_PACK_HEADER, payload)
    at = 8
    raw_names = payload[at : at + size]
    channels = _CHANNELS.get(raw_names)
    if channels is None:
        if len(_CHANNELS) > 4096:
            _CHANNELS.clear()
        channels = _CHANNELS[raw_names] = tuple(raw_names.decode().split("\x00"))
    at += size
    times = np.frombuffer(payload, np.int64, n, at)
    at += 8 * n
    labels = np.frombuffer(payload, np.int8, n, at).astype(np.int64)
    at += n
    values = np.frombuffer(payload, np.float64, n * len(channels), at)
    return channels, values.reshape(n, len(channels)), labels, times


def unpacked_readings(device_id: str, payload: bytes) -> list[Reading]:
    """The Readings again (for a dead letter: the error path only)."""
    channels, values, labels, times = unpack(payload)
    return [
        Reading(device_id, t, tuple(v), None if label < 0 else label, channels)
        for t, v, label in zip(times.tolist(), values.tolist(), labels.tolist(), strict=True)
    ]


# --- keyed state as compact bytes ------------------------------------------------------------
# The profile: pickling the DeviceState dataclass (nested frozen dataclasses, ~20 numpy arrays,
# lists of arrays) on every write and unpickling it on every read was ~10 % of the job's Python
# time. These bytes are one int64 header, the float64 arrays back to back, the int64 arrays,
# the bool array and the names: a few numpy calls each way.

_STATE_FORMAT = 4  # first header field: a later layout gets a new number (and reads this one)
# 1: before the discriminant's histograms; < 3: 18 features; < 4: no personal model
_READABLE_FORMATS = (1, 2, 3, 4)
_HEADER_FIELDS = 22


def _widened(rows: np.ndarray) -> np.ndarray:
    if rows.shape[1] == N_FEATURES:
        return rows
    return np.hstack((rows, np.zeros((rows.shape[0], N_FEATURES - rows.shape[1]))))


def encode_state(state: DeviceState) -> bytes:
    f = state.features
    c = f.n_channels if f is not None else 0
    window = f.window.shape[0] if f is not None else 0
    rows = np.vstack(state.rows) if state.rows else np.zeros((0, N_FEATURES))
    labels = np.concatenate(state.labels) if state.labels else np.zeros(0, np.int64)
    pseudo = np.concatenate(state.pseudo) if state.pseudo else np.zeros(0, bool)
    positives = -1 if state.positives is None else state.positives.shape[0]
    params = -1 if state.local_params is None else state.local_params.size
    names = "\x00".join(f.channels if f is not None else ()).encode()
    p = state.prequential
    header = [
        _STATE_FORMAT,
        -1 if f is None else c,
        *((f.seen, f.count, f.refreshed_at, f.gated) if f is not None else (0, 0, 0, 0)),
        window,
        rows.shape[0],
        state.buffered,
        positives,
        state.rounds,
        params,
        state.scored_version,
        p.tp,
        p.fp,
        p.tn,
        p.fn,
        0 if f is None else f.z_window.shape[0],  # formats < 3: per-detector counts
        len(names),
        state.hist_pos.size,
        state.hist_normal.size,
        state.since_ms,  # 0 in states written before it had a slot
    ]
    floats = [rows.ravel(), state.positives, state.local_params]
    if f is not None:
        floats[:0] = [
            f.mean,
            f.m2,
            f.comoment.ravel(),
            f.precision.ravel(),
            f.window.ravel(),
            f.z_window.ravel(),
        ]
        floats.append(f.last_abs_z)
    counts = [
        np.asarray(header, np.int64),
        labels,
        state.hist_pos,
        state.hist_neg,
        state.hist_normal,
        state.hist_normal_pos,
        state.hist_normal_neg,
        state.hist_disc_pos,
        state.hist_disc_neg,
    ]
    return b"".join(
        [
            *(np.ascontiguousarray(a, np.int64).data for a in counts),
            *(np.ascontiguousarray(a, np.float64).data for a in floats if a is not None),
            np.ascontiguousarray(pseudo, bool).data,
            names,
            _encode_personal(state.personal),
        ]
    )


# The personal model after the names, float64 of a fixed size (none: no bytes): counts, means,
# the upper triangle of the summed co-moment (it is symmetric), histograms, wins, losses,
# threshold and parameters (None: NaN, a discriminant's are finite).
_UPPER = np.triu_indices(N_FEATURES)
_BINS = LOGIT_EDGES.size + 1
_PERSONAL_FLOATS = 2 + 2 * N_FEATURES + _UPPER[0].size + 2 * _BINS + 3 + (N_FEATURES + 1)


def _encode_personal(personal: PersonalModel | None) -> bytes:
    if personal is None:
        return b""
    p = personal
    parts = [
        p.counts,
        p.means.ravel(),
        p.within[_UPPER],
        p.hist_pos,
        p.hist_neg,
        [p.wins, p.losses, np.nan if p.threshold is None else p.threshold],
        np.full(N_FEATURES + 1, np.nan) if p.params is None else p.params,
    ]
    return np.concatenate([np.asarray(a, np.float64) for a in parts]).tobytes()


def _decode_personal(payload: bytes, at: int) -> PersonalModel | None:
    if at >= len(payload):
        return None
    floats = np.frombuffer(payload, np.float64, _PERSONAL_FLOATS, at)
    sizes = (2, 2 * N_FEATURES, _UPPER[0].size, _BINS, _BINS, 3, N_FEATURES + 1)
    counts, means, upper, hist_pos, hist_neg, scalars, params = (
        a.copy() for a in np.split(floats, np.cumsum(sizes)[:-1])
    )
    within = np.zeros((N_FEATURES, N_FEATURES))
    within[_UPPER] = upper
    within.T[_UPPER] = upper
    wins, losses, threshold = scalars.tolist()
    return PersonalModel(
        counts,
        means.reshape(2, N_FEATURES),
        within,
        hist_pos,
        hist_neg,
        None if np.isnan(params[0]) else params,
        None if math.isnan(threshold) else threshold,
        wins,
        losses,
    )


def decode_state(payload: bytes) -> DeviceState:
    header = np.frombuffer(payload, np.int64, _HEADER_FIELDS).tolist()
    (
        fmt,
        c,
        seen,
        count,
        refreshed_at,
        gated,
        window,
        n_rows,
        buffered,
        positives,
        rounds,
        params,
        scored_version,
        tp,
        fp,
        tn,
        fn,
        z_rows,  # format < 3: the number of per-detector counts, no longer used
        n_names,
        logit_bins,
        normal_bins,
        since_ms,
    ) = header
    if fmt not in _READABLE_FORMATS:
        raise ValueError(f"keyed state of format {fmt}, this job reads {_READABLE_FORMATS}")
    at = 8 * _HEADER_FIELDS

    def take(dtype, n: int) -> np.ndarray:
        nonlocal at
        out = np.frombuffer(payload, dtype, n, at).copy()  # writable, as the learner expects
        at += out.nbytes
        return out

    labels = take(np.int64, n_rows)
    hists = [
        take(np.int64, n) for n in (logit_bins, logit_bins, normal_bins, normal_bins, normal_bins)
    ]
    if fmt >= 2:
        hists += [take(np.int64, logit_bins), take(np.int64, logit_bins)]
    else:
        hists += [np.zeros(logit_bins, np.int64), np.zeros(logit_bins, np.int64)]
    if fmt < 3:
        take(np.int64, 4 * z_rows)  # an older job's per-detector counts
        z_rows = 0  # and no z window: it starts empty
    features = None
    if c >= 0:
        mean, m2 = take(np.float64, c), take(np.float64, c)
        comoment = take(np.float64, c * c).reshape(c, c)
        precision = take(np.float64, c * c).reshape(c, c)
        window_values = take(np.float64, window * c).reshape(window, c)
        z_window = take(np.float64, z_rows * c).reshape(z_rows, c)
    # Rows an older job buffered have only the pooled features: their channel slots are 0.
    width = N_FEATURES if fmt >= 3 else N_POOLED
    rows = _widened(take(np.float64, n_rows * width).reshape(n_rows, width))
    kept = None
    if positives >= 0:
        kept = _widened(take(np.float64, positives * width).reshape(-1, width))
    local_params = None if params < 0 else take(np.float64, params)
    if c >= 0:
        last_abs_z = take(np.float64, c)
    pseudo = take(bool, n_rows)
    names = payload[at : at + n_names].decode().split("\x00") if n_names else []
    personal = _decode_personal(payload, at + n_names) if fmt >= 4 else None
    if c >= 0:
        features = FeatureState(
            channels=tuple(names[:c]),
            seen=seen,
            count=count,
            mean=mean,
            m2=m2,
            comoment=comoment,
            precision=precision,
            refreshed_at=refreshed_at,
            window=window_values,
            last_abs_z=last_abs_z,
            gated=gated,
            z_window=z_window,
        )
    return DeviceState(
        features=features,
        rows=[rows] if n_rows else [],
        labels=[labels] if n_rows else [],
        pseudo=[pseudo] if n_rows else [],
        buffered=buffered,
        positives=kept,
        rounds=rounds,
        since_ms=since_ms,
        local_params=local_params,
        hist_pos=hists[0],
        hist_neg=hists[1],
        hist_normal=hists[2],
        hist_normal_pos=hists[3],
        hist_normal_neg=hists[4],
        hist_disc_pos=hists[5],
        hist_disc_neg=hists[6],
        prequential=Confusion(tp, fp, tn, fn),
        scored_version=scored_version,
        personal=personal,
    )
